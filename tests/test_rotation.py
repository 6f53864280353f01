"""Randomized Hadamard rotation: the transform, its storage, and rotated layers end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.rotation import (
    fwht,
    hadamard_block,
    pack_signs,
    random_signs,
    rotate,
    unpack_signs,
    unrotate,
)

PROPERTY = settings(max_examples=40, deadline=None)


def dense_hadamard(block: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / block**0.5


@pytest.mark.parametrize("n, block", [(1, 1), (6, 2), (64, 64), (576, 64), (1536, 512), (75, 1)])
def test_block_is_the_largest_power_of_two_dividing_n(n, block):
    assert hadamard_block(n) == block


@pytest.mark.parametrize("n", [8, 96, 576])
def test_fwht_equals_the_dense_block_diagonal_matrix(n):
    block = hadamard_block(n)
    dense = torch.block_diag(*[dense_hadamard(block)] * (n // block))
    x = torch.randn(3, n, dtype=torch.float64).float()
    torch.testing.assert_close(fwht(x), x @ dense.T, rtol=1e-5, atol=1e-5)


@PROPERTY
@given(rows=st.integers(1, 4), n=st.sampled_from([1, 2, 12, 64, 96, 100]), seed=st.integers(0, 99))
def test_rotation_is_orthogonal_and_inverted_by_unrotate(rows, n, seed):
    x = torch.randn(rows, n)
    signs = random_signs(n, seed)
    y = rotate(x, signs)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unrotate(y, signs), x, rtol=1e-5, atol=1e-5)


@PROPERTY
@given(n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_signs_pack_and_unpack_exactly(n, seed):
    signs = random_signs(n, seed)
    packed = pack_signs(signs)
    assert packed.shape == (1, (n + 7) // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_signs(packed, n), signs)


@pytest.mark.parametrize(
    "spec",
    [
        lowbit.QuantSpec(bits=4, group_size=64, rotation="hadamard"),
        lowbit.QuantSpec(bits=8, rotation="hadamard", symmetric=True),
        lowbit.QuantSpec(
            bits=3, group_size=32, symmetric=True, grid="gaussian", rotation="hadamard"
        ),
    ],
    ids=lambda s: s.label,
)
def test_rotated_layers_compute_the_restored_weight(spec, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(192, 64), nn.GELU(), nn.Linear(64, 32))
    report = lowbit.quantize_model(model, spec, progress=False)
    assert all(r.spec.endswith("rot") for r in report.quantized)
    layer = model[0]
    assert layer.signs is not None and layer.quantized_weight.bits_per_weight > spec.bits
    x = torch.randn(100, 192)  # above max_tokens: the fallback path
    ref = F.linear(x, layer.dequantize_weight(), layer.bias)
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)
    small = layer(x[:2])  # packed kernel path where one applies (bf16 activations)
    assert ((small - ref[:2]).norm() / ref[:2].norm()) < 1e-2
    lowbit.save(model, tmp_path / "m")
    fresh = lowbit.load(
        tmp_path / "m", nn.Sequential(nn.Linear(192, 64), nn.GELU(), nn.Linear(64, 32))
    )
    assert torch.equal(fresh[0].signs, layer.signs)
    assert torch.equal(fresh(x), model(x))


def test_gradients_flow_through_the_rotation():
    torch.manual_seed(0)
    layer = lowbit.QuantLinear.from_linear(
        nn.Linear(64, 16), lowbit.QuantSpec(bits=8, rotation="hadamard"), kernel="dequantize"
    )
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    expected = torch.ones(4, 16) @ layer.dequantize_weight()
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-4)


def test_rotation_helps_a_layer_with_outlier_inputs():
    # A few input columns 30x larger: without rotation their groups waste the grid.
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    w[:, :4] *= 30
    plain = lowbit.quantize(w, lowbit.QuantSpec(bits=3, group_size=64))
    rotated = lowbit.quantize(w, lowbit.QuantSpec(bits=3, group_size=64, rotation="hadamard"))

    def err(qt):
        return ((qt.dequantize() - w).norm() / w.norm()).item()

    assert err(rotated) < 0.8 * err(plain)


def test_bad_rotation_arguments():
    with pytest.raises(ValueError, match="rotation"):
        lowbit.QuantSpec(rotation="givens")
    with pytest.raises(TypeError, match="rotation_seed"):
        lowbit.QuantSpec(rotation="hadamard", rotation_seed=1.5)
    with pytest.raises(ValueError, match="positive"):
        hadamard_block(0)


def test_rotation_on_odd_widths_is_reported():
    model = nn.Sequential(nn.Linear(75, 16), nn.Linear(16, 8))
    report = lowbit.quantize_model(
        model, lowbit.QuantSpec(bits=8, rotation="hadamard"), progress=False
    )
    assert report.warnings == [
        "layer '0': in_features 75 allows Hadamard blocks of only 1; the rotation does little there"
    ]
