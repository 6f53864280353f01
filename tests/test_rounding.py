"""Rounding steps: the registry, the `nearest` step, and a step plugged in from outside."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lowbit
from lowbit.rounding import Output, Problem, available_roundings, get_rounding, register_rounding
from lowbit.rounding import registry as rounding_registry

SPECS = [
    lowbit.QuantSpec(bits=4, group_size=32),
    lowbit.QuantSpec(bits=3, group_size=20, zero_point="float", fit="mse"),
    lowbit.QuantSpec(bits=8, symmetric=True),
    lowbit.QuantSpec(bits=4, grid="nf4", granularity="tensor"),
]


@pytest.mark.parametrize("name", available_roundings())
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_every_registered_rounding_restores_within_its_blocks(name, spec):
    w = torch.randn(12, 70, generator=torch.Generator().manual_seed(0))
    qt = lowbit.quantize(w, dataclasses.replace(spec, rounding=name))
    restored = qt.dequantize()
    assert restored.shape == w.shape and torch.isfinite(restored).all()
    assert (restored - w).norm() < 0.5 * w.norm()


def test_nearest_is_the_default_and_rounds_each_weight_to_its_nearest_code():
    spec = lowbit.QuantSpec(bits=4, group_size=16, symmetric=True)
    assert spec.rounding == "nearest" and "nearest" in available_roundings()
    w = torch.randn(4, 64)
    qt = lowbit.quantize(w, spec)
    scale = qt.scale.float().repeat_interleave(16, dim=1)
    expected = (w / scale).round().clamp(-8, 7) + 8
    assert torch.equal(qt.codes().float(), expected)


def test_unknown_and_malformed_roundings():
    with pytest.raises(ValueError, match="unknown rounding 'gptq-x'; registered"):
        lowbit.quantize(torch.randn(2, 8), lowbit.QuantSpec(bits=4, rounding="gptq-x"))
    with pytest.raises(TypeError, match="rounding"):
        lowbit.QuantSpec(bits=4, rounding=None)
    with pytest.raises(ValueError, match="already registered"):
        register_rounding("nearest", get_rounding("nearest"))
    with pytest.raises(TypeError, match="callable"):
        register_rounding("x", 3)


def test_a_step_registered_from_outside_gets_the_whole_weight_and_its_context(monkeypatch):
    # What an error-feedback method (GPTQ) needs: the whole 2-D weight with its blocks, the
    # fit, and per-layer statistics; quantize.py is not edited to add it.
    seen = {}

    def round_down_toward_zero(problem: Problem, out: Output) -> None:
        seen["shape"] = tuple(problem.matrix.shape)
        seen["context"] = problem.context
        seen["groups"] = problem.blocks.groups
        for r0, r1 in problem.row_chunks():
            rows = problem.complete_groups(problem.matrix[r0:r1])
            blocks = rows.float().reshape(-1, problem.blocks.group_len)
            scale, zero, kept = problem.fit_blocks(blocks, problem.group_weights(r0, r1))
            out.put_params(slice(r0, r1), scale, zero, kept)
            step = out.scale[r0:r1].float().repeat_interleave(problem.blocks.group_len, dim=1)
            codes = (rows / step).trunc().clamp(-8, 7) + 8
            out.put_codes(r0, r1, codes[:, : problem.blocks.cols].to(torch.uint8))

    monkeypatch.setitem(rounding_registry._ROUNDINGS, "toward-zero", round_down_toward_zero)
    spec = lowbit.QuantSpec(bits=4, group_size=16, symmetric=True, rounding="toward-zero")
    assert spec.label.endswith("toward-zero")
    w = torch.randn(6, 48)
    qt = lowbit.quantize(w, spec, context={"hessian": "H"})
    assert seen == {"shape": (6, 48), "context": {"hessian": "H"}, "groups": 3}
    restored = qt.dequantize()
    nearest = lowbit.quantize(w, lowbit.QuantSpec(bits=4, group_size=16, symmetric=True))
    assert torch.equal(qt.scale, nearest.scale)  # same fit, different rounding
    assert (restored.abs() <= w.abs() + 1e-6).all()  # truncation never grows a weight
    assert not torch.equal(restored, nearest.dequantize())
