"""Shared fixtures: small real Hugging Face models built locally, and the default real model."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Searches on small tensors score eagerly anyway; this keeps the larger ones in the tests from
# compiling kernels (seconds each). test_fits checks the compiled scorer against the eager one.
os.environ.setdefault("LOWBIT_COMPILE", "0")

# CI must not go red on a draw: the default profile replays the same examples on every run.
# HYPOTHESIS_PROFILE=explore draws fresh ones each run, to hunt for new failures.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct fp32 checkpoint (downloaded and converted on first use)."""
    from lowbit.models import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A small Llama causal LM (random weights, real architecture and tokenizer) on disk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
