"""Greedy generation with prefill and decode speed: the end-to-end figure users compare.

`generate` runs a Hugging Face causal LM (float or quantized) with its KV cache and times the
two phases separately: the prefill (one forward over the prompt, which yields the first new
token) and the decode (one forward per further token). The times come from a logits processor,
which transformers calls once per new token right after that token's forward.

With ``compile=True`` the decode step runs compiled (TorchInductor, static shapes) against a
static KV cache, as gpt-fast does: transformers' own automatic compilation, switched on for the
CPU too. The first decode step then includes the compilation (a minute or more on two cores,
less when Inductor's on-disk cache has it); it is reported as ``compile_s`` and left out of the
decode speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

MAX_NEW_TOKENS = 1 << 16


@dataclass
class Generation:
    """What `generate` produced and how fast.

    Attributes:
        text: the new tokens decoded (the prompt not included).
        prompt_tokens: tokens in the prompt.
        new_tokens: tokens generated (fewer than asked when the model ends the text).
        prefill_s: seconds from the call to the first new token (the prompt's forward).
        decode_s: seconds for the remaining ``new_tokens - 1`` tokens (compiled: the
            ``new_tokens - 2`` after the first decode step).
        compile_s: compiled runs: the first decode step (compilation included); else 0.
    """

    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    compile_s: float = 0.0

    @property
    def decode_steps(self) -> int:
        """Decode steps ``decode_s`` covers."""
        return max(0, self.new_tokens - (2 if self.compile_s else 1))

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens processed per second."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second (0.0 when there were none)."""
        steps = self.decode_steps
        if steps <= 0:
            return 0.0
        return steps / self.decode_s if self.decode_s > 0 else float("inf")

    def summary(self) -> str:
        """One line: prefill and decode tokens and tokens/s."""
        line = (
            f"prefill: {self.prompt_tokens} tokens in {self.prefill_s:.3f} s "
            f"({self.prefill_tokens_per_s:.1f} tok/s) | decode: {self.decode_steps} tokens in "
            f"{self.decode_s:.3f} s ({self.decode_tokens_per_s:.1f} tok/s)"
        )
        if self.compile_s:
            line += f" | compile + first decode step: {self.compile_s:.1f} s"
        return line


class _StepClock:
    """A logits processor that leaves the scores alone and notes when each token's forward
    finished."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def generate(
    model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, *, compile: bool = False
) -> Generation:
    """Greedy decoding of ``prompt`` with ``model``'s KV cache, timed per phase.

    Args:
        model: a Hugging Face causal LM (``generate`` method), float or quantized.
        tokenizer: its tokenizer.
        prompt: non-empty text.
        max_new_tokens: 1..65536; the prompt plus these must fit the model's context.
        compile: run the decode step compiled against a static KV cache (see the module).

    Returns:
        A `Generation` (text, token counts, prefill and decode seconds).

    Raises:
        TypeError: ``prompt`` not a str, ``max_new_tokens`` not an int, ``compile`` not a
            bool, or ``model`` cannot generate.
        ValueError: an empty prompt (or one that tokenizes to nothing), ``max_new_tokens`` out
            of range, or prompt + new tokens beyond the context.
    """
    from transformers import LogitsProcessorList

    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {compile!r}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new_tokens}")
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"{type(model).__name__} cannot generate (not a causal language model)")
    if not prompt.strip():
        raise ValueError("prompt is empty")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("prompt tokenizes to no tokens")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and ids.shape[1] + max_new_tokens > context:
        raise ValueError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
            f"model's context of {context} tokens"
        )
    device = next(model.parameters()).device
    clock = _StepClock()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = _compiled_decoding() if compile else {}
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=pad,
            **options,
        )
    new = out[0, ids.shape[1] :]
    times = clock.times or [time.perf_counter()]
    compile_s = 0.0
    if compile and len(times) >= 2:
        compile_s = times[1] - times[0]
        times = times[1:]
    return Generation(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=int(ids.shape[1]),
        new_tokens=int(new.numel()),
        prefill_s=clock.times[0] - start if clock.times else times[0] - start,
        decode_s=times[-1] - times[0],
        compile_s=compile_s,
    )


def _compiled_decoding() -> dict:
    """``generate`` options for a static cache and a compiled decode step on any device
    (transformers compiles automatically only on GPUs; CUDA graphs, its default mode, are
    GPU-only, hence mode "default")."""
    from transformers import CompileConfig

    config = CompileConfig(dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers' switch for compiling off-GPU
    return {"cache_implementation": "static", "compile_config": config}
