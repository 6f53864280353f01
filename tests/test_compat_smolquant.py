"""SmolQuant's API: same formulas as the seed on ordinary rows, the seed's faults fixed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.compat.smolquant import (
    W8A16LinearLayer,
    channel_linear_quantize,
    linear_quantize,
    replace_linear_with_target_and_quantize,
)


def seed_channel_quantize(w: torch.Tensor):
    """The seed's per-row formulas, written out (valid for rows holding both signs)."""
    lo = w.min(dim=1).values
    hi = w.max(dim=1).values
    scale = (hi - lo) / 255
    zero = torch.round(-128 - lo / scale)
    q = torch.clamp(torch.round(w / scale[:, None] + zero[:, None]), -128, 127)
    return scale, zero, q


def mixed_sign_rows(rows: int, cols: int) -> torch.Tensor:
    w = torch.randn(rows, cols)
    w[:, 0] = -w[:, 0].abs() - 0.1
    w[:, 1] = w[:, 1].abs() + 0.1
    return w


def test_channel_quantize_matches_seed_formulas_on_mixed_sign_rows():
    w = mixed_sign_rows(32, 64)
    scales, zeros, q = channel_linear_quantize(w)
    ref_scale, ref_zero, ref_q = seed_channel_quantize(w)
    torch.testing.assert_close(scales, ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(zeros, ref_zero.to(torch.int32))
    # Rounding may differ only where w/scale + zero sits on a .5 tie (reciprocal vs division).
    assert (q.to(torch.int32) - ref_q.to(torch.int32)).abs().max() <= 1
    assert (q.to(torch.int32) != ref_q.to(torch.int32)).float().mean() < 1e-3
    assert scales.dtype == torch.float32 and zeros.dtype == torch.int32 and q.dtype == torch.int8


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 8),
    cols=st.integers(1, 40),
    offset=st.floats(-50, 50),
    spread=st.floats(1e-3, 10),
)
def test_channel_quantize_restores_within_half_a_step(rows, cols, offset, spread):
    w = torch.randn(rows, cols) * spread + offset
    scales, zeros, q = channel_linear_quantize(w)
    assert zeros.min() >= -128 and zeros.max() <= 127
    restored = scales[:, None] * (q.float() - zeros[:, None].float())
    assert ((restored - w).abs() <= scales[:, None] * 0.5 * (1 + 1e-4) + 1e-6).all()


def test_all_positive_and_all_negative_rows_do_not_wrap():
    # The seed cast the zero point to int8 before clamping: these rows wrapped around.
    w = torch.stack([torch.linspace(5.0, 6.0, 16), torch.linspace(-6.0, -5.0, 16)])
    scales, zeros, q = channel_linear_quantize(w)
    restored = scales[:, None] * (q.float() - zeros[:, None].float())
    assert (restored - w).abs().max() <= scales.max() / 2 + 1e-6
    assert zeros.tolist() == [-128, 127]


def test_constant_and_zero_rows_are_exact():
    w = torch.stack([torch.full((8,), 3.0), torch.zeros(8), torch.full((8,), -0.25)])
    scales, zeros, q = channel_linear_quantize(w)
    restored = scales[:, None] * (q.float() - zeros[:, None].float())
    torch.testing.assert_close(restored, w, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(scales).all()


def test_linear_quantize_per_tensor_and_dim_one():
    w = torch.randn(6, 10)
    scale, zero, q = linear_quantize(w)
    assert scale.shape == () and zero.shape == () and q.shape == w.shape
    assert ((scale * (q.float() - zero.float()) - w).abs() <= scale / 2 + 1e-6).all()
    scales, zeros, q1 = channel_linear_quantize(w, dim=1)
    assert scales.shape == (10,) and q1.shape == w.shape
    restored = scales[None, :] * (q1.float() - zeros[None, :].float())
    assert ((restored - w).abs() <= scales[None, :] / 2 + 1e-6).all()


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match="dtype"):
        linear_quantize(torch.randn(4), dtype=torch.int16)
    with pytest.raises(ValueError, match="dim"):
        channel_linear_quantize(torch.randn(4, 4), dim=2)
    with pytest.raises(ValueError, match="NaN"):
        channel_linear_quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError):
        channel_linear_quantize(torch.ones(3, 3, dtype=torch.int32))
    layer = W8A16LinearLayer(8, 4)
    with pytest.raises(ValueError, match="shape"):
        layer.quantize(torch.randn(4, 9))
    with pytest.raises(ValueError, match="bias"):
        W8A16LinearLayer(8, 4, bias=torch.zeros(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_is_a_quantlinear_and_keeps_the_model_dtype(dtype):
    w = mixed_sign_rows(32, 64).to(dtype)
    bias = torch.randn(32).to(dtype)
    layer = W8A16LinearLayer(64, 32, dtype=dtype, bias=bias)
    assert isinstance(layer, lowbit.QuantLinear)
    scales, zero_pts, quant = layer.quantize(w)
    assert torch.equal(quant, layer.int8_weights) and torch.equal(scales, layer.scales)
    restored = layer.linear_dequantize(scales, zero_pts, quant)
    assert restored.dtype == dtype
    torch.testing.assert_close(restored, layer.dequantize_weight(), rtol=0, atol=0)
    for tokens in (1, 100):  # packed kernel and dequantize paths
        x = torch.randn(tokens, 64).to(dtype)
        y = layer(x)
        assert y.dtype == dtype  # the seed returned bf16 here
        ref = torch.nn.functional.linear(x.float(), restored.float(), bias.float())
        assert ((y.float() - ref).norm() / ref.norm()) < 1e-2


def test_replace_excludes_by_local_name_at_any_depth():
    model = nn.Sequential()
    model.add_module("block", nn.Sequential())
    model.block.add_module("proj", nn.Linear(16, 16))
    model.block.add_module("lm_head", nn.Linear(16, 16))
    model.add_module("lm_head", nn.Linear(16, 8))
    model.add_module("out", nn.Linear(8, 4, bias=False))
    x = torch.randn(3, 16)
    before = model.block.proj(x)
    replace_linear_with_target_and_quantize(model, W8A16LinearLayer, ["lm_head"])
    assert isinstance(model.block.proj, W8A16LinearLayer)
    assert isinstance(model.out, W8A16LinearLayer) and model.out.bias is None
    assert type(model.lm_head) is nn.Linear and type(model.block.lm_head) is nn.Linear
    after = model.block.proj(x)
    assert ((after - before).norm() / before.norm()) < 1e-2


def test_replace_leaves_the_model_unchanged_on_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer '1'"):
        replace_linear_with_target_and_quantize(model, W8A16LinearLayer, [])
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear


def test_saved_and_loaded_through_lowbit(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    replace_linear_with_target_and_quantize(model, W8A16LinearLayer, [])
    lowbit.save(model, tmp_path / "m")
    fresh = lowbit.load(
        tmp_path / "m", nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    )
    x = torch.randn(2, 32)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(fresh[0].packed, model[0].packed)


def test_a_smolquant_state_dict_loads_and_matches_its_formula():
    # What SmolQuant itself saves: int8 codes, per-row scales, int8 zero points (possibly
    # wrapped by its int8 cast); its dequantization is scales * (q - zero_point).
    torch.manual_seed(0)
    codes = torch.randint(-128, 128, (8, 32), dtype=torch.int8)
    scales = torch.rand(8) * 0.01 + 1e-3
    zeros = torch.randint(-128, 128, (8,), dtype=torch.int8)
    bias = torch.randn(8)
    layer = W8A16LinearLayer(32, 8, bias=torch.zeros(8))
    layer.load_state_dict(
        {"int8_weights": codes, "scales": scales, "zero_point": zeros, "bias": bias}
    )
    expected = scales[:, None] * (codes.float() - zeros[:, None].float())
    torch.testing.assert_close(layer.dequantize_weight(), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(layer.int8_weights, codes) and torch.equal(layer.zero_point, zeros.int())
    x = torch.randn(100, 32)
    torch.testing.assert_close(layer(x), x @ expected.T + bias, rtol=1e-5, atol=1e-5)


def test_replace_keeps_a_shared_linear_shared():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    replace_linear_with_target_and_quantize(model, W8A16LinearLayer, [])
    assert model[0] is model[2] and isinstance(model[0], W8A16LinearLayer)


def test_argument_types_are_checked():
    with pytest.raises(TypeError, match="dim"):
        channel_linear_quantize(torch.randn(4, 4), dim="0")
    with pytest.raises(TypeError, match="weight"):
        W8A16LinearLayer(4, 4).quantize([[0.0] * 4] * 4)
    with pytest.raises(TypeError, match="bias"):
        W8A16LinearLayer(4, 4, bias="yes")
