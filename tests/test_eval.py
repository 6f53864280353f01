"""`lowbit.eval`: the fixed WikiText-2 slice and perplexity, checked against independent sums."""

from __future__ import annotations

import hashlib
import math
from importlib import resources
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.eval import eval_tokens, perplexity, wikitext2_test_text

RAW_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from lowbit.io.hf import load_pretrained

    return load_pretrained(tiny_llama_dir)


def test_vendored_text_and_its_normalisation():
    raw = resources.files("lowbit.data").joinpath("wiki.test.raw").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == RAW_SHA256
    lines = raw.decode("utf-8").split("\r\n")
    paragraphs = [line for line in lines if line.strip()]
    assert len(paragraphs) == 2891
    text = wikitext2_test_text()
    assert text == "\n\n".join(paragraphs)
    assert "\r" not in text and "\n\n\n" not in text
    assert text.startswith(" = Robert Boulter = \n\n Robert Boulter is an English film")


def test_eval_tokens_are_the_first_tokens_of_the_text(tiny):
    _, tokenizer = tiny
    tokens = eval_tokens(tokenizer, seq_len=32, windows=3)
    assert tokens.shape == (3, 32) and tokens.dtype == torch.long
    # The tiny tokenizer has one token per printable character; newlines are <unk>.
    pieces = tokenizer.convert_ids_to_tokens(tokens.flatten().tolist())
    text = "".join("\n" if p == tokenizer.unk_token else p for p in pieces)
    assert text == wikitext2_test_text()[:96]
    assert text.startswith(" = Robert Boulter = \n\n Robert")


def test_eval_tokens_are_deterministic_and_consistent(tiny):
    _, tokenizer = tiny
    a = eval_tokens(tokenizer, seq_len=64, windows=4)
    b = eval_tokens(tokenizer, seq_len=64, windows=4)
    assert torch.equal(a, b)
    # Non-overlapping windows of one prefix: another split of the same tokens.
    assert torch.equal(eval_tokens(tokenizer, seq_len=16, windows=16).flatten(), a.flatten())
    assert torch.equal(eval_tokens(tokenizer, seq_len=64, windows=2), a[:2])


class CoarseTokenizer:
    """One token per 20 characters: needs more text than the first guess of 8 chars a token."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        assert add_special_tokens is False
        self.calls.append(len(text))
        return {"input_ids": list(range(len(text) // 20))}


def test_eval_tokens_reads_more_text_when_needed():
    tokenizer = CoarseTokenizer()
    tokens = eval_tokens(tokenizer, seq_len=10, windows=5)
    assert torch.equal(tokens, torch.arange(50).view(5, 10))
    assert tokenizer.calls == [400, 800, 1600]


def test_eval_tokens_beyond_the_split():
    tokenizer = CoarseTokenizer()
    available = len(wikitext2_test_text()) // 20
    with pytest.raises(ValueError, match=f"only {available} tokens, {available + 1} requested"):
        eval_tokens(tokenizer, seq_len=available + 1, windows=1)
    assert tokenizer.calls[-1] >= len(wikitext2_test_text())
    assert eval_tokens(tokenizer, seq_len=available, windows=1).numel() == available


@pytest.mark.parametrize(("seq_len", "windows"), [(1, 4), (0, 4), (-3, 4), (32, 0), (32, -1)])
def test_eval_tokens_rejects_bad_sizes(seq_len, windows):
    with pytest.raises(ValueError, match="seq_len must be >= 2 and windows >= 1"):
        eval_tokens(CoarseTokenizer(), seq_len=seq_len, windows=windows)


def test_perplexity_matches_an_independent_computation(tiny):
    model, tokenizer = tiny
    tokens = eval_tokens(tokenizer, seq_len=32, windows=3)
    result = perplexity(model, tokens)
    assert result.tokens == 3 * 31
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.double()  # all windows in one batch
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert result.perplexity == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    with torch.no_grad():  # and transformers' own loss (mean NLL of the shifted labels)
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in tokens]
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert 1 < result.perplexity < 2 * model.config.vocab_size
    assert result.seconds >= 0


class Uniform(nn.Module):
    """Same logits for every token: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.full((vocab,), 0.25))

    def forward(self, input_ids):
        logits = self.bias.expand(*input_ids.shape, -1)
        return SimpleNamespace(logits=logits)


class Bigram(nn.Module):
    """Logits from a fixed table indexed by the previous token."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    tokens = torch.randint(0, 37, (2, 9))
    result = perplexity(Uniform(37), tokens)
    assert result.perplexity == pytest.approx(37, rel=1e-6)
    assert result.tokens == 16


def test_perplexity_of_a_bigram_model():
    model = Bigram(11)
    tokens = torch.randint(0, 11, (4, 7))
    with torch.no_grad():
        logits = model.table[tokens[:, :-1]].reshape(-1, 11).double()
        expected = F.cross_entropy(logits, tokens[:, 1:].reshape(-1)).item()
    assert perplexity(model, tokens).perplexity == pytest.approx(math.exp(expected), rel=1e-6)


@pytest.mark.parametrize("shape", [(16,), (1, 2, 8)])
def test_perplexity_needs_windows(shape):
    with pytest.raises(ValueError, match="tokens must be \\[windows, seq_len\\]"):
        perplexity(Uniform(5), torch.zeros(shape, dtype=torch.long))
