"""SmolQuant's API: same formulas as the seed on ordinary rows, the seed's faults fixed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.compat import smolquant
from lowbit.compat.smolquant import (
    W8A16LinearLayer,
    channel_linear_quantize,
    linear_quantize,
    replace_linear_with_target_and_quantize,
)


def seed_channel_quantize(w: torch.Tensor):
    """The seed's per-row formulas and ``[rows, 1]`` shapes (valid for rows holding both signs)."""
    lo = w.min(dim=1, keepdim=True).values
    hi = w.max(dim=1, keepdim=True).values
    scale = (hi - lo) / 255
    zero = torch.round(-128 - lo / scale)
    q = torch.clamp(torch.round(w / scale + zero), -128, 127)
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
    restored = scales * (q - zeros)
    assert ((restored - w).abs() <= scales * 0.5 * (1 + 1e-4) + 1e-6).all()


def test_all_positive_and_all_negative_rows_do_not_wrap():
    # The seed cast the zero point to int8 before clamping: these rows wrapped around.
    w = torch.stack([torch.linspace(5.0, 6.0, 16), torch.linspace(-6.0, -5.0, 16)])
    scales, zeros, q = channel_linear_quantize(w)
    restored = scales * (q - zeros)
    assert (restored - w).abs().max() <= scales.max() / 2 + 1e-6
    assert zeros.flatten().tolist() == [-128, 127]


def test_constant_and_zero_rows_are_exact():
    w = torch.stack([torch.full((8,), 3.0), torch.zeros(8), torch.full((8,), -0.25)])
    scales, zeros, q = channel_linear_quantize(w)
    restored = scales * (q - zeros)
    torch.testing.assert_close(restored, w, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(scales).all()


def test_linear_quantize_per_tensor_and_dim_one():
    w = torch.randn(6, 10)
    scale, zero, q = linear_quantize(w)
    assert scale.shape == (1, 1) and zero.shape == (1, 1) and q.shape == w.shape
    assert ((scale * (q.float() - zero.float()) - w).abs() <= scale / 2 + 1e-6).all()
    scales, zeros, q1 = channel_linear_quantize(w, dim=1)
    assert scales.shape == (1, 10) and q1.shape == w.shape
    restored = scales * (q1.float() - zeros.float())
    assert ((restored - w).abs() <= scales / 2 + 1e-6).all()


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
    assert restored.dtype == torch.float32  # the seed's dtype; dequantize_weight: the model's
    torch.testing.assert_close(restored.to(dtype), layer.dequantize_weight(), rtol=0, atol=0)
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
    # lowbit.load builds plain QuantLinear layers; above max_tokens both dequantize in fp32.
    x = torch.randn(100, 32)
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
    assert torch.equal(layer.int8_weights, codes)
    assert torch.equal(layer.zero_point, zeros.int()[:, None])
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


# --------------------------------------------------------------------------- the seed's shapes


def test_channel_quantize_returns_broadcastable_shapes_on_a_square_matrix():
    # SmolQuant returns [C, 1] (dim 0) and [1, C] (dim 1), so that scale * (q - zero_point)
    # pairs each scale with its channel. Flat [C] vectors pair with the columns instead: on a
    # square matrix that gives wrong values without an error.
    w = torch.randn(48, 48) * torch.logspace(-2, 1, 48)[:, None]
    for dim, shape in ((0, (48, 1)), (1, (1, 48)), (-1, (1, 48)), (-2, (48, 1))):
        ww = w if dim in (0, -2) else w.t().contiguous()
        scales, zeros, q = channel_linear_quantize(ww, dim=dim)
        assert scales.shape == shape and zeros.shape == shape and q.shape == ww.shape
        assert scales.dtype == torch.float32 and zeros.dtype == torch.int32
        restored = scales * (q - zeros)
        assert ((restored - ww).abs() <= scales * 0.5 * (1 + 1e-4) + 1e-7).all(), dim
        assert torch.equal(restored, smolquant.linear_dequantize(scales, zeros, q))


def test_channel_quantize_keeps_the_other_dims_for_any_rank():
    x = torch.randn(3, 5, 4)
    scales, zeros, q = channel_linear_quantize(x, dim=1)
    assert scales.shape == (1, 5, 1) and zeros.shape == (1, 5, 1) and q.shape == x.shape
    restored = scales * (q - zeros)
    assert ((restored - x).abs() <= scales * 0.5 * (1 + 1e-4) + 1e-7).all()
    scales1, _, _ = channel_linear_quantize(torch.randn(7), dim=0)
    assert scales1.shape == (7,)


def test_linear_quantize_difference_computes_in_int32():
    # All-positive data: zero point -128 and codes up to 127, so q - zero_point reaches 255.
    # With a 0-d or Python-int zero point PyTorch computes int8 q minus it in int8 (wraps).
    w = torch.linspace(0.5, 3.0, 60).view(6, 10)
    scale, zero, q = linear_quantize(w)
    assert scale.shape == (1, 1) and zero.shape == (1, 1)
    assert scale.dtype == torch.float32 and zero.dtype == torch.int32 and q.dtype == torch.int8
    assert int(zero) == -128 and int(q.max()) == 127
    assert ((scale * (q - zero) - w).abs() <= scale / 2 + 1e-6).all()
    assert float(scale) == scale.item()  # converts like the seed's Python numbers
    one_d, zero_1d, _ = linear_quantize(torch.randn(5))
    assert one_d.shape == (1,) and zero_1d.shape == (1,)


def test_layer_buffers_have_the_seeds_shapes_and_dequantize_broadcasts_as_given():
    w = mixed_sign_rows(32, 32) * torch.logspace(-2, 1, 32)[:, None]
    layer = W8A16LinearLayer(32, 32)
    scales, zero_pts, quant = layer.quantize(w)
    assert scales.shape == (32, 1) and zero_pts.shape == (32, 1) and quant.shape == (32, 32)
    assert layer.scales.shape == (32, 1) and layer.zero_point.shape == (32, 1)
    restored = layer.linear_dequantize(scales, zero_pts, quant)
    assert torch.equal(restored, layer.dequantize_weight())
    assert torch.equal(layer.scales * (layer.int8_weights - layer.zero_point), restored)
    # Per-column and per-tensor parameters broadcast as given (the seed's formula).
    for s, z, q in (channel_linear_quantize(w, dim=1), linear_quantize(w)):
        out = layer.linear_dequantize(s, z, q)
        assert out.dtype == torch.float32
        assert torch.equal(out, s * (q.float() - z.float()))
        assert ((out - w).abs() <= s * 0.5 * (1 + 1e-4) + 1e-7).all()


def test_a_state_dict_with_the_seeds_buffer_shapes_loads():
    # What SmolQuant's layer registers: int8_weights int8 [out, in], scales [out, 1] in the
    # model's dtype, zero_point int8 [out, 1], and the bias as a buffer in its own dtype.
    torch.manual_seed(1)
    codes = torch.randint(-128, 128, (16, 32), dtype=torch.int8)
    scales = (torch.rand(16, 1) * 0.01 + 1e-3).to(torch.bfloat16)
    zeros = torch.randint(-128, 128, (16, 1), dtype=torch.int8)
    bias = torch.randn(16).to(torch.bfloat16)
    layer = W8A16LinearLayer(32, 16, dtype=torch.bfloat16, bias=True)
    layer.load_state_dict(
        {"int8_weights": codes, "scales": scales, "zero_point": zeros, "bias": bias}
    )
    expected = scales.float() * (codes.float() - zeros.float())
    assert torch.equal(layer.dequantize_weight(torch.float32), expected)
    assert torch.equal(layer.scales, scales.float()) and torch.equal(layer.zero_point, zeros.int())
    assert torch.equal(layer.int8_weights, codes) and torch.equal(layer.bias, bias)


# --------------------------------------------------------------------------- the seed's arithmetic


def _seed_forward(layer, x):
    """The seed's forward in ``x``'s dtype: dequantize, matmul, add the bias."""
    scales, zero = layer.scales.reshape(-1, 1), layer.zero_point.reshape(-1, 1)
    weight = scales * (layer.int8_weights.float() - zero.float())
    out = F.linear(x, weight.to(x.dtype))
    return out if layer.bias is None else out + layer.bias.to(x.dtype)


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (48, 16)])
def test_fp32_layer_computes_the_seeds_formula_in_fp32(shape):
    # in_features % 16 == 0: PyTorch's packed int8 CPU kernel (bf16 activations) would apply.
    out_f, in_f = shape
    torch.manual_seed(2)
    layer = W8A16LinearLayer(in_f, out_f, bias=torch.randn(out_f))
    layer.quantize(torch.randn(out_f, in_f))
    for tokens in (1, 4, 48, 100):
        x = torch.randn(tokens, in_f)
        y = layer(x)
        ref = _seed_forward(layer, x)
        assert y.dtype == torch.float32
        assert ((y - ref).norm() / ref.norm()) < 1e-6, tokens
        assert (y - ref).abs().max() <= 1e-6 * ref.abs().max(), tokens


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_layers_are_within_their_dtypes_rounding_of_the_seed(dtype):
    torch.manual_seed(3)
    layer = W8A16LinearLayer(128, 64, dtype=dtype, bias=torch.randn(64).to(dtype))
    layer.quantize((torch.randn(64, 128) + 1.0).to(dtype))
    for tokens in (1, 4, 100):
        x = torch.randn(tokens, 128).to(dtype)
        y = layer(x)
        assert y.dtype == dtype
        exact = _seed_forward(layer, x.double())
        seed = _seed_forward(layer, x).double()
        # float16 must not go through bf16 activations (8x its rounding).
        limit = torch.finfo(dtype).eps
        assert ((seed - exact).norm() / exact.norm()) < limit
        assert ((y.double() - exact).norm() / exact.norm()) < limit, tokens


def test_forward_takes_the_seeds_dtype_argument():
    torch.manual_seed(4)
    layer = W8A16LinearLayer(32, 16, bias=torch.randn(16))
    layer.quantize(torch.randn(16, 32))
    x = torch.randn(4, 32)
    assert torch.equal(layer.forward(x, dtype=torch.float32), layer(x))
    y = layer(x.to(torch.bfloat16), dtype=torch.float32)
    assert y.dtype == torch.float32
    assert torch.equal(y, layer(x.to(torch.bfloat16).float()))
    assert layer(x, dtype=torch.bfloat16).dtype == torch.bfloat16
