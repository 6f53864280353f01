"""Accuracy measures: WikiText-2 perplexity on a fixed slice of the test split."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.progress import bar

DEFAULT_SEQ_LEN = 512
DEFAULT_WINDOWS = 16


def wikitext2_test_text() -> str:
    """The WikiText-2 (raw) test split, normalised as its SOURCE.txt says (vendored copy)."""
    raw = resources.files("lowbit.data").joinpath("wiki.test.raw").read_text(encoding="utf-8")
    lines = [line for line in raw.replace("\r\n", "\n").split("\n") if line.strip()]
    return "\n\n".join(lines)


def eval_tokens(
    tokenizer, seq_len: int = DEFAULT_SEQ_LEN, windows: int = DEFAULT_WINDOWS
) -> torch.Tensor:
    """The fixed evaluation slice: the first ``windows * seq_len`` tokens of the test split.

    Returns int64 ``[windows, seq_len]``: non-overlapping windows, the same every run (no
    special tokens added, no shuffling).
    """
    if seq_len < 2 or windows < 1:
        raise ValueError(f"seq_len must be >= 2 and windows >= 1, got {seq_len}, {windows}")
    text = wikitext2_test_text()
    needed = seq_len * windows
    chars = needed * 8
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > needed or chars >= len(text):
            break
        chars *= 2
    if len(ids) < needed:
        raise ValueError(f"the test split has only {len(ids)} tokens, {needed} requested")
    # The last token of the prefix may be cut mid-word: only whole tokens before it are used.
    return torch.tensor(ids[:needed], dtype=torch.long).view(windows, seq_len)


@dataclass
class PerplexityResult:
    """Perplexity, number of scored tokens and seconds taken."""

    perplexity: float
    tokens: int
    seconds: float


@torch.inference_mode()
def perplexity(
    model: nn.Module, tokens: torch.Tensor, *, progress: bool | None = None
) -> PerplexityResult:
    """Perplexity of a causal LM on ``tokens`` (int64 ``[windows, seq_len]``, each window
    scored alone); ``progress``: a bar over the windows (``None``: on a terminal, after 2 s)."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [windows, seq_len], got shape {list(tokens.shape)}")
    device = next(model.parameters()).device
    start = time.perf_counter()
    total_nll, count = 0.0, 0
    for window in bar(tokens, "evaluating", unit="window", progress=progress):
        ids = window.unsqueeze(0).to(device)
        logits = model(input_ids=ids).logits.float()
        nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total_nll += nll.item()
        count += ids.shape[1] - 1
    return PerplexityResult(math.exp(total_nll / count), count, time.perf_counter() - start)
