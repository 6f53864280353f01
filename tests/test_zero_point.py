"""Float zero points (zero_point="float"): exact min/max ranges, asymmetric codebooks, storage."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.tensor import QuantizedTensor


@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(2, 8),
    group=st.sampled_from([8, 16, 32]),
    offset=st.floats(-5, 5),
    spread=st.floats(1e-2, 5),
    seed=st.integers(0, 1000),
)
def test_float_zero_restores_within_half_a_step(bits, group, offset, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 64, generator=gen) * spread + offset
    spec = lowbit.QuantSpec(bits=bits, group_size=group, zero_point="float", scale_dtype="float32")
    qt = lowbit.quantize(w, spec)
    scale = qt.scale.repeat_interleave(group, dim=1)
    assert ((qt.dequantize() - w).abs() <= scale * 0.5 * (1 + 1e-4) + 1e-6).all()
    assert qt.zero.dtype == torch.float32 and qt.zero.shape == (6, 64 // group)


def test_float_zero_uses_the_blocks_own_range():
    # All-positive blocks: the integer zero point stretches the grid down to 0, the float one not.
    w = torch.rand(16, 64) * 0.5 + 0.5
    as_int = lowbit.quantize(w, lowbit.QuantSpec(bits=4, group_size=32))
    as_float = lowbit.quantize(w, lowbit.QuantSpec(bits=4, group_size=32, zero_point="float"))
    err_int = (as_int.dequantize() - w).norm()
    err_float = (as_float.dequantize() - w).norm()
    assert err_float < 0.6 * err_int
    assert as_float.bits_per_weight == 4 + 16 / 32 + 16 / 32  # fp16 scale + fp16 zero


def test_q4_1_blocks_are_restored_exactly():
    # llama.cpp's Q4_1: w = d * q + m per 32 weights, q in 0..15 (both ends used here).
    d = torch.rand(8, 4, 1) * 0.01 + 1e-3
    m = torch.randn(8, 4, 1) * 0.01
    q = torch.randint(0, 16, (8, 4, 32)).float()
    q[..., 0], q[..., 1] = 0, 15
    w = (q * d + m).view(8, 128)
    spec = lowbit.QuantSpec(bits=4, group_size=32, zero_point="float", scale_dtype="float32")
    torch.testing.assert_close(lowbit.quantize(w, spec).dequantize(), w, rtol=0, atol=1e-7)


@pytest.mark.parametrize("grid", ["nf4", "gaussian", "laplace-quantile"])
def test_codebooks_take_asymmetric_specs_with_a_float_zero(grid):
    w = torch.randn(32, 64) * 0.1 + 0.3
    spec = lowbit.QuantSpec(bits=4, group_size=32, grid=grid, zero_point="float")
    qt = lowbit.quantize(w, spec)
    sym = lowbit.quantize(w, lowbit.QuantSpec(bits=4, group_size=32, grid=grid, symmetric=True))
    assert (qt.dequantize() - w).norm() < (sym.dequantize() - w).norm()


@pytest.mark.parametrize("bits, group", [(4, 32), (3, 64), (8, None)])
def test_float_zero_layers_run_through_kernels_and_save(bits, group, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))
    spec = lowbit.QuantSpec(bits=bits, group_size=group, zero_point="float")
    lowbit.quantize_model(model, spec, progress=False)
    layer = model[0]
    x = torch.randn(2, 128)
    ref = torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias)
    assert ((layer(x) - ref).norm() / ref.norm()) < 1e-2  # packed kernel, bf16 activations
    lowbit.save(model, tmp_path / "m")
    fresh = lowbit.load(
        tmp_path / "m", nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))
    )
    assert torch.equal(fresh[0].zero, layer.zero) and fresh[0].zero.dtype == torch.float16
    assert torch.equal(fresh(x), model(x))


def test_bad_zero_point_arguments():
    with pytest.raises(ValueError, match="zero_point"):
        lowbit.QuantSpec(bits=4, zero_point="double")
    qt = lowbit.quantize(torch.randn(4, 32), lowbit.QuantSpec(bits=4, zero_point="float"))
    tensors = qt.state_tensors()
    with pytest.raises(ValueError, match="'zero' has dtype"):
        QuantizedTensor.from_state({**tensors, "zero": tensors["zero"].float()}, qt.metadata())
    bad = tensors["zero"].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'zero' contains NaN"):
        QuantizedTensor.from_state({**tensors, "zero": bad}, qt.metadata())
    with pytest.raises(ValueError, match="zero_point='float'"):
        lowbit.quantize(torch.randn(4, 32), lowbit.QuantSpec(bits=4, grid="nf4", symmetric=False))


@pytest.mark.parametrize("offset", [1.0, 10.0, -300.0])
def test_float_zero_stays_within_half_a_step_far_from_zero(offset):
    # A zero point stored in code units would lose whole steps here; the value offset does not.
    w = torch.randn(8, 256) * 0.01 + offset
    qt = lowbit.quantize(w, lowbit.QuantSpec(bits=8, zero_point="float"))
    step = qt.scale.float()
    # float32 arithmetic on a zero of ~3e5 code units (offset -300) costs ~2% of a step.
    assert ((qt.dequantize() - w).abs() <= step * 0.5 * 1.05).all()


def test_all_zero_blocks_are_exact_on_every_grid():
    from lowbit.grids import CodebookGrid, available_grids, get_grid

    w = torch.randn(4, 64) * 0.02
    w[1] = 0
    for name in available_grids():
        grid = get_grid(name)
        bits = 4 if grid.min_bits <= 4 <= grid.max_bits else grid.min_bits
        variants = [("float", False)]
        if not isinstance(grid, CodebookGrid) or grid.two_sided(bits):
            variants.append(("int", True))
        if not isinstance(grid, CodebookGrid):
            variants.append(("int", False))
        for zero_point, symmetric in variants:
            spec = lowbit.QuantSpec(
                bits=bits, grid=name, group_size=32, zero_point=zero_point, symmetric=symmetric
            )
            restored = lowbit.quantize(w, spec).dequantize()
            assert torch.equal(restored[1], torch.zeros(64)), spec.label
