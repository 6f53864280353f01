"""End to end on the real all-MiniLM-L6-v2 encoder: quantize, embed real sentences, save, load."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.eval import wikitext2_test_text
from lowbit.io.hf import load_pretrained, load_quantized, save_quantized


@pytest.fixture(scope="module")
def minilm_path():
    from lowbit.models import minilm_dir

    return minilm_dir()


def sentences(n: int = 24) -> list[str]:
    lines = [line.strip() for line in wikitext2_test_text().split("\n\n")]
    return [line for line in lines if len(line) > 80 and not line.startswith("=")][:n]


@torch.inference_mode()
def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Sentence-transformers' recipe for this model: mean pooling, then L2 normalisation."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.parametrize(
    "spec, min_cosine, min_same_neighbour",
    [(lowbit.QuantSpec(bits=8), 0.999, 1.0), (lowbit.QuantSpec(bits=4, group_size=32), 0.94, 0.8)],
    ids=["int8", "int4-g32"],
)
def test_minilm_embeddings_survive_quantization(
    minilm_path, tmp_path, spec, min_cosine, min_same_neighbour
):
    model, tokenizer = load_pretrained(minilm_path)
    texts = sentences()
    reference = embed(model, tokenizer, texts)
    report = lowbit.quantize_model(model, spec, progress=False)
    assert len(report.quantized) == 37  # 6 layers x 6 Linear + the pooler
    quantized = embed(model, tokenizer, texts)
    cosine = (reference * quantized).sum(-1)
    assert cosine.min() > min_cosine
    # Retrieval is preserved: each sentence's nearest neighbour is (mostly) the same as in fp32.
    nearest_fp = (reference @ reference.T).fill_diagonal_(-1).argmax(-1)
    nearest_q = (quantized @ quantized.T).fill_diagonal_(-1).argmax(-1)
    assert (nearest_fp == nearest_q).float().mean() >= min_same_neighbour
    save_quantized(model, tokenizer, tmp_path / "q", metadata={"source_model": str(minilm_path)})
    loaded, loaded_tokenizer = load_quantized(tmp_path / "q")
    assert torch.equal(embed(loaded, loaded_tokenizer, texts), quantized)
