"""End to end on the real SmolLM2-135M-Instruct: quantize, measure, save, load, run."""

from __future__ import annotations

import math

import torch

import lowbit
from lowbit.eval import eval_tokens, perplexity
from lowbit.io.hf import load_pretrained, load_quantized, save_quantized


def test_smollm2_int4_g64_and_int8_round_trip(smollm2_path, tmp_path):
    model, tokenizer = load_pretrained(smollm2_path)
    tokens = eval_tokens(tokenizer, seq_len=128, windows=2)
    fp = perplexity(model, tokens).perplexity
    assert 5 < fp < 200

    report = lowbit.quantize_model(
        model, lowbit.QuantSpec(bits=4, group_size=64), exclude=["lm_head"], progress=False
    )
    assert len(report.quantized) == 210 and [r.name for r in report.skipped] == ["lm_head"]
    assert 4.25 < report.avg_bits_per_weight < 4.4
    assert report.bytes_after < 0.35 * report.bytes_before
    q4 = perplexity(model, tokens).perplexity
    assert fp < q4 < 1.6 * fp  # 4-bit costs something, but the model still works

    out = tmp_path / "int4"
    save_quantized(model, tokenizer, out, metadata={"source_model": str(smollm2_path)})
    loaded, _ = load_quantized(out)
    for name, module in model.named_modules():
        if isinstance(module, lowbit.QuantLinear):
            other = loaded.get_submodule(name)
            assert torch.equal(module.packed, other.packed)
            assert torch.equal(module.scale, other.scale)
    with torch.inference_mode():
        a = model(input_ids=tokens[:1]).logits
        b = loaded(input_ids=tokens[:1]).logits
    assert torch.equal(a, b)
    assert math.isclose(perplexity(loaded, tokens).perplexity, q4, rel_tol=1e-6)


def test_smollm2_int8_is_nearly_lossless(smollm2_path):
    model, tokenizer = load_pretrained(smollm2_path)
    tokens = eval_tokens(tokenizer, seq_len=128, windows=2)
    fp = perplexity(model, tokens).perplexity
    lowbit.quantize_model(model, lowbit.QuantSpec(bits=8), exclude=["lm_head"], progress=False)
    q8 = perplexity(model, tokens).perplexity
    assert abs(q8 - fp) < 0.01 * fp


def test_smollm2_calibrated_mse_beats_minmax(smollm2_path, tmp_path):
    # The searching fit with activation importance (Tiny Shakespeare) against plain min/max
    # at the same size, judged end to end on WikiText-2; then saved and loaded exactly.
    from lowbit.calibrate import calibration_batches, input_importance

    model, tokenizer = load_pretrained(smollm2_path)
    tokens = eval_tokens(tokenizer, seq_len=128, windows=4)
    importance = input_importance(model, calibration_batches(tokenizer, 4, 128))
    results = {}
    for fit, imp in (("minmax", None), ("mse", importance)):
        model, _ = load_pretrained(smollm2_path)
        spec = lowbit.QuantSpec(
            bits=3,
            group_size=64,
            fit=None if fit == "minmax" else fit,
            fit_options=None if fit == "minmax" else {"candidates": 40},
        )
        report = lowbit.quantize_model(
            model, spec, exclude=["lm_head"], progress=False, importance=imp
        )
        results[fit] = perplexity(model, tokens).perplexity
        assert 2.5 < report.avg_code_entropy < 3.0
    assert results["mse"] < 0.8 * results["minmax"]

    out = tmp_path / "mse"
    save_quantized(model, tokenizer, out, metadata={})
    loaded, _ = load_quantized(out)
    assert math.isclose(perplexity(loaded, tokens).perplexity, results["mse"], rel_tol=1e-6)
