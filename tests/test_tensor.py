"""QuantizedTensor: block layout, storage accounting, state round trips and from_state checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import QuantizedTensor, QuantSpec, quantize
from lowbit.tensor import BlockLayout

SCALE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def expected_bits_per_weight(shape, spec: QuantSpec) -> float:
    """Bits stored per weight, counted from the spec alone (codes + scales + zero points)."""
    rows = shape[0] if len(shape) > 1 else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
    if rows * cols == 0:
        return 0.0
    if spec.granularity == "tensor":
        blocks_per_row, scale_rows = 1, 1
    elif spec.granularity == "channel":
        blocks_per_row, scale_rows = 1, rows
    else:
        blocks_per_row, scale_rows = cols // spec.group_size, rows
    code_bits = rows * math.ceil(cols * spec.bits / 8) * 8
    scale_bits = scale_rows * blocks_per_row * SCALE_BYTES[spec.scale_dtype] * 8
    zero_bits = 0 if spec.symmetric else scale_rows * math.ceil(blocks_per_row * spec.bits / 8) * 8
    return (code_bits + scale_bits + zero_bits) / (rows * cols)


@pytest.mark.parametrize(
    ("shape", "spec"),
    [
        ((32, 128), QuantSpec(bits=4, group_size=64)),
        ((32, 128), QuantSpec(bits=4, group_size=64, symmetric=True)),
        ((16, 64), QuantSpec(bits=8)),
        ((16, 64), QuantSpec(bits=8, symmetric=True, scale_dtype="float32")),
        ((24, 96), QuantSpec(bits=3, group_size=32)),
        ((10, 30), QuantSpec(bits=2, group_size=3, scale_dtype="bfloat16")),
        ((7, 13), QuantSpec(bits=5, granularity="tensor")),
        ((5, 4, 6), QuantSpec(bits=6, group_size=8)),
        ((33,), QuantSpec(bits=7)),
    ],
)
def test_bits_per_weight_matches_an_independent_count(shape, spec):
    qt = quantize(torch.randn(shape), spec)
    assert qt.bits_per_weight == pytest.approx(expected_bits_per_weight(shape, spec), rel=1e-12)
    assert qt.nbytes * 8 == pytest.approx(qt.bits_per_weight * math.prod(shape))


def test_bits_per_weight_known_values():
    assert quantize(torch.randn(16, 64), QuantSpec(bits=8, symmetric=True)).bits_per_weight == 8.25
    # 4 bits + fp16 scale per 128 + one 4-bit zero per 128 (two groups share a byte).
    qt = quantize(torch.randn(16, 256), QuantSpec(bits=4, group_size=128))
    assert qt.bits_per_weight == 4 + 16 / 128 + 8 / 256
    assert quantize(torch.empty(0, 8), QuantSpec(bits=4)).bits_per_weight == 0.0


@pytest.mark.parametrize(
    ("shape", "spec", "layout"),
    [
        ((6, 8), QuantSpec(granularity="tensor"), (6, 8, 1, 1, 8)),
        ((6, 8), QuantSpec(), (6, 8, 6, 1, 8)),
        ((6, 8), QuantSpec(group_size=4), (6, 8, 6, 2, 4)),
        ((6, 2, 4), QuantSpec(group_size=2), (6, 8, 6, 4, 2)),
        ((8,), QuantSpec(), (1, 8, 1, 1, 8)),
        ((), QuantSpec(), (1, 1, 1, 1, 1)),
        ((0, 8), QuantSpec(group_size=4), (0, 8, 0, 2, 4)),
        ((5, 0), QuantSpec(group_size=4), (5, 0, 5, 0, 4)),
    ],
)
def test_block_layout(shape, spec, layout):
    lay = BlockLayout.of(shape, spec)
    assert (lay.rows, lay.cols, lay.scale_rows, lay.groups, lay.group_len) == layout
    shapes = lay.expected_shapes(spec)
    assert shapes["packed"] == (layout[0], math.ceil(layout[1] * spec.bits / 8))
    assert shapes["scale"] == (layout[2], layout[3])
    assert shapes["zero"] == (layout[2], math.ceil(layout[3] * spec.bits / 8))
    assert "zero" not in lay.expected_shapes(QuantSpec(symmetric=True))


def test_block_layout_partial_last_group():
    lay = BlockLayout.of((4, 8), QuantSpec(group_size=5))
    assert (lay.groups, lay.group_len, lay.padded_cols, lay.ragged) == (2, 5, 10, True)
    assert lay.expected_shapes(QuantSpec(group_size=5))["scale"] == (4, 2)
    assert not BlockLayout.of((4, 10), QuantSpec(group_size=5)).ragged
    big = BlockLayout.of((4, 8), QuantSpec(group_size=64))  # larger than the row: one per row
    assert (big.groups, big.group_len, big.ragged) == (1, 8, False)


def test_accessors():
    w = torch.randn(6, 16, dtype=torch.float16)
    qt = quantize(w, QuantSpec(bits=3, group_size=8, symmetric=True))
    assert qt.numel() == 96
    assert qt.device == torch.device("cpu")
    assert qt.codes().shape == (6, 16) and qt.codes().dtype == torch.uint8
    assert torch.all(qt.zero_points() == 4) and qt.zero_points().shape == (6, 2)
    assert set(qt.state_tensors()) == {"packed", "scale"}
    assert qt.dequantize().dtype == torch.float16
    assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(qt.dequantize(torch.float32).half(), qt.dequantize())
    copy = qt.to("cpu")
    assert torch.equal(copy.dequantize(), qt.dequantize())
    meta = qt.to("meta")
    assert meta.device.type == "meta" and meta.shape == qt.shape


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, group_size=8),
        QuantSpec(bits=3, symmetric=True, scale_dtype="float32"),
        QuantSpec(bits=2, granularity="tensor", scale_dtype="bfloat16"),
        QuantSpec(bits=8),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 16), (4, 2, 8), (0, 16), (3, 0)])
def test_state_round_trip(spec, dtype, shape):
    qt = quantize(torch.randn(shape).to(dtype), spec)
    metadata = json.loads(json.dumps(qt.metadata()))
    tensors = {k: v.clone() for k, v in qt.state_tensors().items()}
    back = QuantizedTensor.from_state(tensors, metadata)
    assert back.spec == spec and back.shape == qt.shape and back.dtype == dtype
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert back.bits_per_weight == qt.bits_per_weight
    assert (back.zero is None) == spec.symmetric


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
    symmetric=st.booleans(),
    scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    rows=st.integers(0, 5),
    groups=st.integers(0, 4),
    group_size=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_state_round_trip_property(
    bits, granularity, symmetric, scale_dtype, dtype, rows, groups, group_size, seed
):
    spec = QuantSpec(
        bits=bits,
        granularity=granularity,
        group_size=group_size if granularity == "group" else None,
        symmetric=symmetric,
        scale_dtype=scale_dtype,
    )
    gen = torch.Generator().manual_seed(seed)
    qt = quantize(torch.randn(rows, groups * group_size, generator=gen).to(dtype), spec)
    metadata = json.loads(json.dumps(qt.metadata()))
    back = QuantizedTensor.from_state(dict(qt.state_tensors()), metadata)
    assert back.spec == spec and back.shape == qt.shape and back.dtype == dtype
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert torch.equal(back.codes(), qt.codes())
    assert back.bits_per_weight == pytest.approx(expected_bits_per_weight(qt.shape, spec))


def _state(spec=None, shape=(8, 16)):
    spec = spec or QuantSpec(bits=4, group_size=8)
    qt = quantize(torch.randn(shape), spec)
    return dict(qt.state_tensors()), qt.metadata()


@pytest.mark.parametrize("name", ["packed", "scale", "zero"])
def test_from_state_missing_tensor(name):
    tensors, metadata = _state()
    del tensors[name]
    with pytest.raises(ValueError, match=f"'{name}'"):
        QuantizedTensor.from_state(tensors, metadata)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("packed", (8, 9)), ("packed", (7, 8)), ("scale", (8, 3)), ("scale", (16,)), ("zero", (8, 2))],
)
def test_from_state_wrong_shapes_name_the_tensor(name, shape):
    tensors, metadata = _state()
    tensors[name] = torch.zeros(shape, dtype=tensors[name].dtype)
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape"):
        QuantizedTensor.from_state(tensors, metadata)


def test_from_state_shape_in_metadata_must_match_tensors():
    tensors, metadata = _state()
    metadata["shape"] = [8, 24]
    with pytest.raises(ValueError, match="tensor 'packed'"):
        QuantizedTensor.from_state(tensors, metadata)


def test_from_state_wrong_dtypes():
    tensors, metadata = _state()
    bad = dict(tensors, packed=tensors["packed"].to(torch.int8))
    with pytest.raises(ValueError, match="'packed' must be uint8"):
        QuantizedTensor.from_state(bad, metadata)
    bad = dict(tensors, zero=tensors["zero"].to(torch.int16))
    with pytest.raises(ValueError, match="'zero' must be uint8"):
        QuantizedTensor.from_state(bad, metadata)
    bad = dict(tensors, scale=tensors["scale"].float())
    with pytest.raises(ValueError, match="'scale' has dtype"):
        QuantizedTensor.from_state(bad, metadata)
    for dtype in ("float64", "int8", "fp16"):
        with pytest.raises(ValueError, match=dtype):
            QuantizedTensor.from_state(tensors, dict(metadata, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_from_state_rejects_non_finite_scales(bad):
    tensors, metadata = _state()
    scale = tensors["scale"].clone()
    scale[2, 1] = bad
    with pytest.raises(ValueError, match="'scale'.*NaN or Inf"):
        QuantizedTensor.from_state(dict(tensors, scale=scale), metadata)


def test_from_state_checks_the_spec():
    tensors, metadata = _state()
    spec = dict(metadata["spec"], bits=1)
    with pytest.raises(ValueError, match="bits=1"):
        QuantizedTensor.from_state(tensors, dict(metadata, spec=spec))
    spec = dict(metadata["spec"], bits=9)
    with pytest.raises(ValueError, match="bits"):
        QuantizedTensor.from_state(tensors, dict(metadata, spec=spec))
    spec = dict(metadata["spec"], group_size=5)  # a valid layout, but not these tensors'
    with pytest.raises(ValueError, match="tensor 'scale' has shape"):
        QuantizedTensor.from_state(tensors, dict(metadata, spec=spec))
    spec = dict(metadata["spec"], grid="nf")
    with pytest.raises(ValueError, match="unknown grid"):
        QuantizedTensor.from_state(tensors, dict(metadata, spec=spec))
    spec = dict(metadata["spec"], extra=1)
    with pytest.raises(ValueError, match="extra"):
        QuantizedTensor.from_state(tensors, dict(metadata, spec=spec))


def test_from_state_symmetric_has_no_zero():
    tensors, metadata = _state(QuantSpec(bits=4, symmetric=True))
    qt = QuantizedTensor.from_state(tensors, metadata)
    assert qt.zero is None
    assert torch.all(qt.zero_points() == 8)


def test_dequantize_into_a_strided_out():
    # out= may be any view of the right shape and dtype (a ragged layout too).
    for group in (5, 4):
        qt = quantize(torch.randn(4, 2, 5), QuantSpec(bits=4, group_size=group))
        out = torch.empty(4, 2, 6)[..., :5]
        assert torch.equal(qt.dequantize(out=out), qt.dequantize())
