"""`quantize` and its parts (grids, fits): error bounds, exact cases, edge cases, bad input."""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import QuantSpec, quantize
from lowbit.fit import available_fits, get_fit, register_fit
from lowbit.grids import UniformIntGrid, available_grids, get_grid, register_grid
from lowbit.packing import unpack
from lowbit.tensor import QuantizedTensor

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# ``lowbit.quantize`` the attribute is the function; the module is needed here.
rounding_problem = importlib.import_module("lowbit.rounding.problem")
SCALE_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-22}


def layout_spec(bits: int, granularity: str, symmetric: bool = False) -> QuantSpec:
    """A spec of ``granularity`` (groups of 4 when grouped)."""
    return QuantSpec(
        bits=bits,
        granularity=granularity,
        group_size=4 if granularity == "group" else None,
        symmetric=symmetric,
    )


def blocks_of(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The float32 blocks ``[B, n]`` the spec cuts ``w`` into, computed from the docs."""
    rows = w.shape[0] if w.dim() else 1
    matrix = w.to(torch.float32).reshape(rows, -1) if w.dim() > 1 else w.float().reshape(1, -1)
    if spec.granularity == "tensor":
        return matrix.reshape(1, -1)
    if spec.granularity == "channel":
        return matrix
    return matrix.reshape(-1, spec.group_size)


def reference_dequantize(qt) -> torch.Tensor:
    """``(code - zero) * scale`` rebuilt from the stored tensors, as float32 ``[rows, cols]``."""
    codes = qt.codes().to(torch.float32)
    rows, cols = codes.shape
    bits = qt.spec.bits
    scale = qt.scale.to(torch.float32)
    if qt.zero is None:
        zero = torch.full(scale.shape, float(1 << (bits - 1)))
    else:
        zero = unpack(qt.zero, bits, scale.shape[1]).to(torch.float32)
    group_len = cols // scale.shape[1] if scale.shape[1] else 0
    scale = scale.repeat_interleave(group_len, dim=1).expand(rows, cols)
    zero = zero.repeat_interleave(group_len, dim=1).expand(rows, cols)
    return (codes - zero) * scale


def step_per_element(qt, rows: int, cols: int) -> torch.Tensor:
    scale = qt.scale.to(torch.float32)
    group_len = cols // scale.shape[1]
    return scale.repeat_interleave(group_len, dim=1).expand(rows, cols)


def assert_within_half_step(w: torch.Tensor, qt) -> None:
    rows = w.shape[0] if w.dim() > 1 else 1
    ref = w.to(torch.float32).reshape(rows, -1)
    restored = qt.dequantize(torch.float32).reshape(rows, -1)
    step = step_per_element(qt, *ref.shape)
    err = (ref - restored).abs()
    bound = step * (0.5 + 1e-4) + ref.abs() * 1e-6
    assert torch.all(err <= bound), f"max error {(err / step).max().item():.6f} steps"


@st.composite
def quant_cases(draw):
    bits = draw(st.integers(2, 8))
    granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
    symmetric = draw(st.booleans())
    dtype = draw(st.sampled_from(FLOATS))
    scale_dtype = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    rows = draw(st.integers(1, 5))
    if granularity == "group":
        group_size = draw(st.sampled_from([1, 2, 3, 5, 8, 16]))
        cols = group_size * draw(st.integers(1, 4))
    else:
        group_size = None
        cols = draw(st.integers(1, 33))
    # Symmetric specs default to absmax (minmax falls back to it); asymmetric ones to minmax,
    # or absmax with a stored zero point at the grid centre.
    fit = draw(st.sampled_from([None, "absmax", "minmax"]))
    spec = QuantSpec(
        bits=bits,
        group_size=group_size,
        granularity=granularity,
        symmetric=symmetric,
        fit=fit,
        scale_dtype=scale_dtype,
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "positive", "negative", "outlier", "sparse"]))
    w = torch.randn(rows, cols, generator=gen)
    if kind == "positive":
        w = w.abs() + 0.5
    elif kind == "negative":
        w = -w.abs()
    elif kind == "outlier":
        w[0, 0] = 40.0
    elif kind == "sparse":
        w[torch.rand(rows, cols, generator=gen) < 0.5] = 0.0
    w = w * 10.0 ** draw(st.floats(-2, 2))
    return w.to(dtype), spec


@settings(max_examples=150, deadline=None)
@given(quant_cases())
def test_dequantize_is_within_half_a_step(case):
    w, spec = case
    qt = quantize(w, spec)
    out = qt.dequantize()
    assert out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(out, qt.dequantize(torch.float32).to(w.dtype))
    assert qt.scale.dtype == getattr(torch, spec.scale_dtype)
    assert_within_half_step(w, qt)
    # 0.0 lies on the grid: zeros come back exactly.
    zeros = w == 0
    assert torch.all(out[zeros] == 0)
    # dequantize is (code - zero) * scale over the documented block layout.
    rows = w.shape[0]
    assert torch.equal(qt.dequantize(torch.float32).reshape(rows, -1), reference_dequantize(qt))


@settings(max_examples=100, deadline=None)
@given(quant_cases())
def test_fitted_scales_match_the_block_ranges(case):
    w, spec = case
    qt = quantize(w, spec)
    blocks = blocks_of(w, spec)
    stored = qt.scale.to(torch.float32).reshape(-1)
    assert stored.shape[0] == blocks.shape[0]
    center = 1 << (spec.bits - 1)
    if spec.symmetric or spec.fit == "absmax":
        exact = blocks.abs().amax(-1) / (center - 1)
        assert (qt.zero is None) == spec.symmetric
        assert torch.all(qt.zero_points() == center)
    else:
        span = blocks.amax(-1).clamp(min=0) - blocks.amin(-1).clamp(max=0)
        exact = span / ((1 << spec.bits) - 1)
        zero = qt.zero_points().reshape(-1)
        assert torch.all((zero >= 0) & (zero <= (1 << spec.bits) - 1))
        assert torch.equal(zero, zero.round())
    nonzero = exact > 0
    assert torch.all(stored[~nonzero] == 0.0)  # all-zero blocks: scale 0, exact zeros
    eps = SCALE_EPS[spec.scale_dtype]
    assert torch.all(stored[nonzero] >= exact[nonzero] * (1 - 1e-6))
    assert torch.all(stored[nonzero] <= exact[nonzero] * (1 + 2 * eps) + 2.0**-23)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", FLOATS)
def test_values_on_the_grid_restore_exactly(bits, symmetric, dtype):
    step = 2.0**-3
    if symmetric:
        half = (1 << (bits - 1)) - 1
        row = torch.arange(-half, half + 1, dtype=torch.float32) * step
    else:
        levels = torch.arange(0, 1 << bits, dtype=torch.float32)
        row = (levels - (1 << bits) // 3) * step
    w = torch.stack([row, row.flip(0), -row]).to(dtype)
    qt = quantize(w, QuantSpec(bits=bits, symmetric=symmetric, scale_dtype="float16"))
    assert torch.equal(qt.dequantize(), w)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (0, 0), (0,), (2, 0, 4), (0, 3, 4)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_empty_tensors(granularity, shape, dtype):
    spec = layout_spec(4, granularity)
    if granularity == "group" and shape == (2, 0, 4):
        spec = QuantSpec(bits=4, group_size=1)
    w = torch.empty(shape, dtype=dtype)
    qt = quantize(w, spec)
    out = qt.dequantize()
    assert out.shape == w.shape and out.dtype == dtype
    assert torch.equal(out, torch.zeros(shape, dtype=dtype))
    assert qt.numel() == 0 and qt.bits_per_weight == 0.0


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, 1, 1)])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("value", [0.731, -3.5, 1e-3])
def test_one_element(shape, granularity, symmetric, value):
    spec = QuantSpec(
        bits=3,
        granularity=granularity,
        group_size=1 if granularity == "group" else None,
        symmetric=symmetric,
    )
    w = torch.full(shape, value)
    qt = quantize(w, spec)
    out = qt.dequantize()
    assert out.shape == w.shape
    # The only value is the block's extreme: it maps onto the end of the grid.
    assert torch.allclose(out, w, rtol=2e-3, atol=0)
    assert_within_half_step(w, qt)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("value", [0.0, 3.0, -2.5, 1e-3, -0.0])
@pytest.mark.parametrize("dtype", FLOATS)
def test_constant_tensors(granularity, symmetric, value, dtype):
    spec = layout_spec(2, granularity, symmetric)
    w = torch.full((3, 8), value, dtype=dtype)
    qt = quantize(w, spec)
    out = qt.dequantize()
    assert_within_half_step(w, qt)
    if value == 0.0:
        assert torch.equal(out, torch.zeros_like(w))
        assert torch.all(qt.scale == 0)  # all-zero blocks: scale 0
    else:
        assert torch.allclose(out.float(), w.float(), rtol=1e-2, atol=0)
        assert torch.all(out == out.flatten()[0])


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, group_size=4),
        QuantSpec(bits=3, symmetric=True),
        QuantSpec(bits=8, granularity="tensor"),
        QuantSpec(bits=2, group_size=2, symmetric=True),
    ],
)
@pytest.mark.parametrize("dtype", FLOATS)
def test_non_contiguous_inputs_match_contiguous_copy(spec, dtype):
    base = torch.randn(16, 24).to(dtype)
    cube = torch.randn(4, 6, 8).to(dtype)
    views = [base.t(), base[:, ::2], base[1::3, 4:20], cube.permute(2, 0, 1), cube[:, ::2, :]]
    for view in views:
        assert not view.is_contiguous()
        got = quantize(view, spec)
        want = quantize(view.contiguous(), spec)
        for name, tensor in want.state_tensors().items():
            assert torch.equal(got.state_tensors()[name], tensor), name
        assert torch.equal(got.dequantize(), want.dequantize())
        assert got.shape == view.shape


def test_any_rank_is_viewed_as_first_dim_by_rest():
    w = torch.randn(4, 3, 8)
    spec = QuantSpec(bits=4, group_size=6)
    qt = quantize(w, spec)
    flat = quantize(w.reshape(4, 24), spec)
    assert tuple(qt.scale.shape) == (4, 4)
    assert torch.equal(qt.packed, flat.packed)
    assert torch.equal(qt.dequantize(), flat.dequantize().reshape(4, 3, 8))
    vector = torch.randn(10)
    qt = quantize(vector, QuantSpec(bits=5))
    assert tuple(qt.scale.shape) == (1, 1)
    assert qt.dequantize().shape == (10,)
    assert_within_half_step(vector, qt)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_chunked_rows_give_the_same_result(monkeypatch, granularity, symmetric):
    spec = layout_spec(3, granularity, symmetric)
    w = torch.randn(11, 12)
    whole = quantize(w, spec)
    monkeypatch.setattr(rounding_problem, "CHUNK_ELEMENTS", 20)
    chunked = quantize(w, spec)
    for name, tensor in whole.state_tensors().items():
        assert torch.equal(chunked.state_tensors()[name], tensor), name


def test_fp16_tensor_with_a_range_beyond_fp16_max():
    # max - min = 80000 overflows float16: the fit must not run in the input dtype.
    w = torch.tensor([[40000.0, -40000.0, 1.0, 0.0]], dtype=torch.float16)
    for granularity in ("tensor", "channel"):
        qt = quantize(w, QuantSpec(bits=8, granularity=granularity))
        assert_within_half_step(w, qt)


def test_scales_that_overflow_the_scale_dtype():
    w = torch.tensor([[1e30, -1e30, 0.5]])
    with pytest.raises(ValueError, match="overflow"):
        quantize(w, QuantSpec(bits=4))
    qt = quantize(w, QuantSpec(bits=4, scale_dtype="float32"))
    assert_within_half_step(w, qt)


@pytest.mark.parametrize("magnitude", [1e-10, 1e-20, 1e-30])
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, grid="gaussian", symmetric=True),
        QuantSpec(bits=4, grid="nf4", group_size=32),
        QuantSpec(bits=4),
        QuantSpec(bits=4, zero_point="float", group_size=32),
        QuantSpec(bits=8, symmetric=True),
    ],
    ids=lambda s: s.label,
)
def test_scales_that_underflow_the_scale_dtype_are_an_error_not_an_amplification(
    magnitude, spec
):
    # Before: float16 scales rounded up to the smallest subnormal, and grids without a zero
    # level restored 1e-10 weights 26x too large (2.8e11x at 1e-20).
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * magnitude
    with pytest.raises(ValueError, match="scale_dtype='float32'"):
        quantize(w, spec)
    qt = quantize(w, dataclasses.replace(spec, scale_dtype="float32"))
    restored, w = qt.dequantize().double(), w.double()  # float32 norms underflow at 1e-30
    assert (restored - w).norm() < 0.2 * w.norm()


@pytest.mark.parametrize("grid", ["gaussian", "nf4", "int"])
def test_a_few_underflowing_rows_are_stored_as_exact_zeros(grid):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    w[3] *= 1e-12
    w[7, :32] *= 1e-15
    spec = QuantSpec(bits=4, grid=grid, group_size=32)
    restored = quantize(w, spec).dequantize()
    assert torch.all(restored[3] == 0) and torch.all(restored[7, :32] == 0)
    # Each block's error is at most its norm: nothing is amplified.
    blocks = (restored - w).reshape(-1, 32).norm(dim=1)
    assert torch.all(blocks <= w.reshape(-1, 32).norm(dim=1) * (1 + 1e-6))


@settings(max_examples=60, deadline=None)
@given(
    # (Down to 1e-34: below, the float32 weights themselves are near subnormal.)
    exponent=st.floats(-34, 0),
    grid=st.sampled_from(["int", "gaussian", "nf4", "laplace-quantile"]),
    scale_dtype=st.sampled_from(["float16", "bfloat16"]),
    zero_point=st.sampled_from(["int", "float"]),
)
def test_no_block_error_exceeds_its_norm_at_any_magnitude(exponent, grid, scale_dtype, zero_point):
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 10.0**exponent
    spec = QuantSpec(bits=4, grid=grid, group_size=32, scale_dtype=scale_dtype)
    if zero_point == "float":
        spec = dataclasses.replace(spec, symmetric=False, zero_point="float")
    try:
        restored = quantize(w, spec).dequantize()
    except ValueError as err:
        assert "scale_dtype='float32'" in str(err)
        return
    restored, w = restored.double(), w.double()
    errors = (restored - w).reshape(-1, 32).norm(dim=1)
    assert torch.all(errors <= w.reshape(-1, 32).norm(dim=1) * 1.01)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8, symmetric=True),
        QuantSpec(bits=8, zero_point="float"),
        QuantSpec(bits=8, fit="mse"),
        QuantSpec(bits=4, grid="nf4"),
    ],
    ids=lambda s: s.label,
)
def test_dequantize_never_overflows_the_output_dtype(spec):
    # The scale rounds up, so 127 steps reached past 65504: float16 inf before the clamp.
    w = torch.tensor([[65504.0, -65504.0, 1.0, 0.0]], dtype=torch.float16)
    restored = quantize(w, spec).dequantize()
    assert torch.isfinite(restored).all()
    assert restored[0, 0] > 60000 and restored[0, 1] < -60000
    big = torch.tensor([[3.4e38, -3.4e38, 1.0, 0.0]])
    restored = quantize(big, QuantSpec(bits=8, symmetric=True, scale_dtype="float32"))
    assert torch.isfinite(restored.dequantize()).all()


def test_a_finite_range_that_overflows_float32_is_not_called_nan():
    w = torch.tensor([[3.4e38, -3.4e38, 1.0]])
    with pytest.raises(ValueError, match="overflows float32") as info:
        quantize(w, QuantSpec(bits=8, scale_dtype="float32"))
    assert "NaN" not in str(info.value)


def test_meta_tensors_are_refused_clearly():
    with pytest.raises(ValueError, match="meta device"):
        quantize(torch.empty(4, 8, device="meta"), QuantSpec(bits=8), name="layer.w")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", FLOATS)
def test_nan_and_inf_are_rejected(bad, granularity, symmetric, dtype):
    spec = layout_spec(4, granularity, symmetric)
    w = torch.randn(6, 8)
    w[3, 5] = bad
    w = w.to(dtype)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(w, spec)
    with pytest.raises(ValueError, match="layer 'mlp.up'"):
        quantize(w, spec, name="layer 'mlp.up'")


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.float64]
)
def test_unsupported_dtypes_raise_type_error(dtype):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize(torch.zeros(4, 8, dtype=dtype), QuantSpec(bits=4))


def test_bad_argument_types():
    with pytest.raises(TypeError, match="Tensor"):
        quantize([[1.0, 2.0]], QuantSpec())
    with pytest.raises(TypeError, match="QuantSpec"):
        quantize(torch.zeros(2, 2), {"bits": 4})


@pytest.mark.parametrize("dtype", FLOATS)
def test_bits_out_of_the_grid_range(dtype):
    w = torch.randn(4, 8).to(dtype)
    with pytest.raises(ValueError, match="bits=1"):
        quantize(w, QuantSpec(bits=1))
    with pytest.raises(ValueError, match="layer 'q'"):
        quantize(w, QuantSpec(bits=1), name="layer 'q'")
    for bits in (0, 9):
        with pytest.raises(ValueError, match="bits"):
            quantize(w, QuantSpec(bits=bits))


@pytest.mark.parametrize("shape", [(4, 10), (4, 2, 5), (10,), (3, 2)])
@pytest.mark.parametrize("fit", [None, "mse", "hqq"])
@pytest.mark.parametrize("zero_point", ["int", "float"])
def test_partial_last_group(shape, fit, zero_point):
    # A group size that does not divide the row: full groups are quantized exactly as without
    # the tail, and the partial last group exactly as a row of its own (with a group that
    # size): completing it with repeats of its own values keeps its range, and the weighted
    # fits give the repeats no weight.
    torch.manual_seed(0)
    w = torch.randn(shape)
    spec = QuantSpec(bits=4, group_size=4, fit=fit, zero_point=zero_point)
    qt = quantize(w, spec)
    restored = qt.dequantize()
    rows = w.reshape(1 if w.dim() == 1 else w.shape[0], -1)
    cols = rows.shape[1]
    assert restored.shape == w.shape and qt.scale.shape[-1] == -(-cols // 4)
    full, tail = cols // 4 * 4, cols % 4
    flat = restored.reshape(rows.shape)
    if full:
        alone = quantize(rows[:, :full].contiguous(), spec).dequantize()
        assert torch.equal(flat[:, :full], alone)
    if tail:
        tail_spec = QuantSpec(bits=4, group_size=tail, fit=fit, zero_point=zero_point)
        alone = quantize(rows[:, full:].contiguous(), tail_spec).dequantize()
        assert torch.allclose(flat[:, full:], alone, rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 70),
    group=st.integers(1, 80),
    bits=st.sampled_from([2, 3, 4, 8]),
    grid=st.sampled_from(["int", "nf4", "gaussian"]),
)
def test_any_group_size_round_trips(rows, cols, group, bits, grid):
    # (A group larger than the row is the per-row layout: nothing padded, same result.)
    if grid == "nf4":
        bits = 4
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols))
    qt = quantize(w, QuantSpec(bits=bits, group_size=group, grid=grid, symmetric=grid != "int"))
    restored = qt.dequantize()
    assert restored.shape == w.shape and torch.isfinite(restored).all()
    again = QuantizedTensor.from_state(qt.state_tensors(), qt.metadata())
    assert torch.equal(again.dequantize(), restored)
    # No block is worse than a 1-bit sign code would be.
    assert ((restored - w).norm() <= w.norm() * 1.0001).item()
    if group >= cols:
        per_row = QuantSpec(bits=bits, grid=grid, symmetric=grid != "int")
        assert torch.equal(restored, quantize(w, per_row).dequantize())


def test_unknown_grid_and_fit():
    with pytest.raises(ValueError, match="unknown grid 'nf'"):
        quantize(torch.randn(2, 4), QuantSpec(bits=4, grid="nf"))
    with pytest.raises(ValueError, match="unknown fit 'no-such-fit'"):
        quantize(torch.randn(2, 4), QuantSpec(bits=4, fit="no-such-fit"))


def test_returned_tensor_describes_the_input():
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    spec = QuantSpec(bits=4, group_size=8)
    qt = quantize(w, spec)
    assert qt.spec == spec and qt.shape == w.shape and qt.dtype == torch.bfloat16
    assert qt.packed.dtype == torch.uint8 and tuple(qt.packed.shape) == (8, 8)
    assert tuple(qt.scale.shape) == (8, 2) and tuple(qt.zero.shape) == (8, 1)
    assert qt.codes().max().item() <= 15


# --- grids -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_grid_encode_decode(bits):
    grid = get_grid("int")
    top = (1 << bits) - 1
    codes = torch.arange(0, top + 1, dtype=torch.uint8)
    values = grid.decode(codes, bits)
    assert values.dtype == torch.float32
    assert values.tolist() == list(range(top + 1))
    assert torch.equal(grid.encode_(values.clone(), bits), codes)
    assert grid.value_range(bits) == (0.0, float(top))
    assert grid.center(bits) == float(1 << (bits - 1))
    noisy = values + torch.linspace(-0.45, 0.45, top + 1)
    assert torch.equal(grid.encode_(noisy, bits), codes)
    outside = torch.tensor([-7.0, -0.6, top + 0.6, 1e9])
    assert grid.encode_(outside, bits).tolist() == [0, 0, top, top]


@settings(max_examples=100, deadline=None)
@given(
    bits=st.integers(2, 8),
    values=st.lists(st.floats(-300, 300, allow_nan=False, width=32), min_size=1, max_size=20),
)
def test_uniform_grid_encode_decode_property(bits, values):
    grid = get_grid("int")
    top = (1 << bits) - 1
    v = torch.tensor(values, dtype=torch.float32)
    codes = grid.encode_(v.clone(), bits)
    assert codes.dtype == torch.uint8
    restored = grid.decode(codes, bits)
    assert torch.equal(restored, v.round().clamp(0, top))
    inside = (v >= 0) & (v <= top)
    assert torch.all((restored - v).abs()[inside] <= 0.5)
    assert torch.equal(grid.encode_(restored.clone(), bits), codes)


@pytest.mark.parametrize("bits", [0, 1, 9, -3])
def test_uniform_grid_rejects_bits(bits):
    with pytest.raises(ValueError, match=f"bits={bits}"):
        get_grid("int").check_bits(bits)


def test_grid_registry():
    assert "int" in available_grids()
    assert isinstance(get_grid("int"), UniformIntGrid)
    with pytest.raises(ValueError, match="'int'"):
        get_grid("no-such-grid")
    with pytest.raises(ValueError, match="already registered"):
        register_grid(UniformIntGrid())
    assert available_grids().count("int") == 1


# --- fits ------------------------------------------------------------------------------------


def test_minmax_fit_values():
    blocks = torch.tensor([[-1.0, 3.0], [0.0, 0.0], [2.0, 4.0], [-6.0, -3.0]])
    scale, zero = get_fit("minmax")(blocks, get_grid("int"), QuantSpec(bits=2))
    assert torch.allclose(scale, torch.tensor([4 / 3, 0.0, 4 / 3, 2.0]))
    assert torch.allclose(zero, torch.tensor([0.75, 0.0, 0.0, 3.0]))


def test_absmax_fit_values():
    blocks = torch.tensor([[-1.0, 3.0], [0.0, 0.0], [2.0, -4.0]])
    grid = get_grid("int")
    scale, zero = get_fit("absmax")(blocks, grid, QuantSpec(bits=3, symmetric=True))
    assert torch.allclose(scale, torch.tensor([1.0, 0.0, 4 / 3]))
    assert zero is None
    scale, zero = get_fit("absmax")(blocks, grid, QuantSpec(bits=3, fit="absmax"))
    assert torch.allclose(scale, torch.tensor([1.0, 0.0, 4 / 3]))
    assert torch.equal(zero, torch.full((3,), 4.0))
    # minmax on a symmetric spec is absmax.
    scale_mm, zero_mm = get_fit("minmax")(blocks, grid, QuantSpec(bits=3, symmetric=True))
    assert torch.equal(scale_mm, scale) and zero_mm is None


def test_asymmetric_spec_with_absmax_fit_stores_the_centre():
    w = torch.randn(4, 8)
    qt = quantize(w, QuantSpec(bits=4, fit="absmax"))
    assert qt.zero is not None
    assert torch.all(qt.zero_points() == 8)
    sym = quantize(w, QuantSpec(bits=4, symmetric=True))
    assert torch.equal(qt.dequantize(), sym.dequantize())


def test_fit_registry():
    assert {"absmax", "minmax"} <= set(available_fits())
    with pytest.raises(ValueError, match="minmax"):
        get_fit("no-such-fit")
    with pytest.raises(ValueError, match="already registered"):
        register_fit("minmax")(lambda blocks, grid, spec: None)


def test_log2_step_budget_matches_bits():
    # A b-bit asymmetric grid has 2**b - 1 steps between the extremes.
    w = torch.linspace(-1, 1, 64).reshape(1, 64)
    for bits in range(2, 9):
        qt = quantize(w, QuantSpec(bits=bits, scale_dtype="float32"))
        assert math.isclose(qt.scale.item(), 2 / ((1 << bits) - 1), rel_tol=1e-6)


def test_quantizing_a_parameter_keeps_no_autograd_graph():
    weight = torch.nn.Linear(64, 8).weight
    qt = quantize(weight, QuantSpec(bits=4, group_size=32))
    assert not qt.scale.requires_grad and qt.scale.grad_fn is None
    assert not qt.dequantize().requires_grad
