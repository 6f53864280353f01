"""The native CPU dequantize against the eager reference: bit for bit, every grid, width, zero
point, scale dtype, output dtype, group layout and output stride; and its argument checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import QuantSpec, native, quantize
from lowbit.grids import available_grids, get_grid

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler here")

OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def eager(qt, dtype, monkeypatch, **kwargs):
    """The reference: the same call with the native path switched off."""
    with monkeypatch.context() as patch:
        patch.setenv("LOWBIT_NATIVE", "0")
        return qt.dequantize(dtype, **kwargs)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(INT_VIEW[got.dtype]), want.view(INT_VIEW[want.dtype]))


def widths(name: str) -> list[int]:
    grid = get_grid(name)
    return [bits for bits in range(grid.min_bits, grid.max_bits + 1) if bits <= 4 or name == "int"]


@pytest.mark.parametrize(
    ("grid", "bits"), [(name, bits) for name in available_grids() for bits in widths(name)]
)
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_every_grid_and_width_is_bit_exact(grid, bits, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(bits)
    weight = torch.randn(48, 200, generator=gen)
    natural = QuantSpec(bits=bits, grid=grid)
    # One-sided codebooks have no symmetric form and no integer zero point.
    zero = {} if natural.symmetric or grid == "int" else {"zero_point": "float"}
    for spec in (
        QuantSpec(bits=bits, grid=grid, group_size=64, **zero),  # ragged: 200 = 3 x 64 + 8
        QuantSpec(bits=bits, grid=grid, granularity="channel", **zero),
        QuantSpec(
            bits=bits,
            grid=grid,
            group_size=32,
            symmetric=False,
            zero_point="int" if grid == "int" else "float",
        ),
    ):
        qt = quantize(weight, spec)
        assert_same_bits(qt.dequantize(dtype), eager(qt, dtype, monkeypatch))


@settings(max_examples=80, deadline=None)
@given(
    bits=st.integers(2, 8),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
    symmetric=st.booleans(),
    zero_point=st.sampled_from(["int", "float"]),
    scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    dtype=st.sampled_from(OUT_DTYPES),
    rows=st.integers(1, 9),
    cols=st.integers(1, 150),
    group_size=st.integers(1, 80),
    magnitude=st.sampled_from([1e-3, 1.0, 3e4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_int_grid_property(
    bits, granularity, symmetric, zero_point, scale_dtype, dtype, rows, cols, group_size,
    magnitude, seed,
):
    if symmetric and zero_point == "float":
        zero_point = "int"
    spec = QuantSpec(
        bits=bits,
        granularity=granularity,
        group_size=group_size if granularity == "group" else None,
        symmetric=symmetric,
        zero_point=zero_point,
        scale_dtype=scale_dtype,
    )
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * magnitude
    qt = quantize(weight, spec)
    with pytest.MonkeyPatch.context() as patch:
        want = eager(qt, dtype, patch)
    assert_same_bits(qt.dequantize(dtype), want)


def test_values_past_the_output_range_clamp_as_the_reference(monkeypatch):
    weight = torch.tensor([[65504.0, -65504.0, 1.0, 3.0]], dtype=torch.float16)
    qt = quantize(weight, QuantSpec(bits=8, granularity="channel", symmetric=True))
    got = qt.dequantize(torch.float16)
    assert torch.isfinite(got).all()
    assert_same_bits(got, eager(qt, torch.float16, monkeypatch))


def test_rotated_and_strided_outputs(monkeypatch):
    weight = torch.randn(32, 128)
    qt = quantize(weight, QuantSpec(bits=4, group_size=32, rotation="hadamard"))
    for rotated in (False, True):
        want = eager(qt, torch.float32, monkeypatch, rotated=rotated)
        assert_same_bits(qt.dequantize(torch.float32, rotated=rotated), want)
    plain = quantize(weight, QuantSpec(bits=4, group_size=32))
    want = eager(plain, torch.bfloat16, monkeypatch)
    wide = torch.full((32, 160), 7.0, dtype=torch.bfloat16)
    plain.dequantize(torch.bfloat16, out=wide[:, 16:144])  # rows with a stride of 160
    assert_same_bits(wide[:, 16:144], want)
    assert (wide[:, :16] == 7).all() and (wide[:, 144:] == 7).all()
    transposed = torch.empty(128, 32).t()  # no unit column stride: the eager path fills it
    want = eager(plain, torch.float32, monkeypatch)
    assert_same_bits(plain.dequantize(torch.float32, out=transposed), want)


def test_quantlinear_uses_it_and_matches_the_reference(monkeypatch):
    from lowbit.nn import QuantLinear

    layer = torch.nn.Linear(96, 64)
    q = QuantLinear.from_linear(layer, QuantSpec(bits=3, group_size=32), kernel="dequantize")
    x = torch.randn(5, 96)
    got = q(x)
    with monkeypatch.context() as patch:
        patch.setenv("LOWBIT_NATIVE", "0")
        want = q(x)
    assert torch.equal(got, want)


def _args(**overrides):
    qt = quantize(torch.randn(8, 64), QuantSpec(bits=4, group_size=32))
    args = dict(
        packed=qt.packed,
        bits=4,
        group_len=32,
        scale=qt.scale,
        zero_kind=native.ZERO_PACKED_INT,
        zero=qt.zero,
        center=8.0,
        vmin=0.0,
        values=None,
        limit=3e38,
        out=torch.empty(8, 64),
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"packed": torch.zeros(8, 31, dtype=torch.uint8)}, "packed shape"),
        ({"packed": torch.zeros(8, 32, dtype=torch.int32)}, "uint8"),
        ({"bits": 9}, "bits"),
        ({"group_len": 0}, "group_len"),
        ({"scale": torch.ones(8, 3)}, "scale"),
        ({"scale": torch.ones(8, 2, dtype=torch.int32)}, "scale"),
        ({"zero": None}, "zero"),
        ({"zero_kind": 7}, "zero_kind"),
        ({"values": torch.zeros(3)}, "values"),
        ({"out": torch.empty(8, 64, dtype=torch.int32)}, "out"),
        ({"out": torch.empty(64, 8).t()}, "unit column stride"),
    ],
)
def test_bad_arguments_raise_naming_them(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lowbit_native.dequantize_(*_args(**overrides).values())


def test_good_arguments_match_the_reference(monkeypatch):
    args = _args()
    qt = quantize(torch.randn(8, 64), QuantSpec(bits=4, group_size=32))
    args.update(packed=qt.packed, scale=qt.scale, zero=qt.zero)
    torch.ops.lowbit_native.dequantize_(*args.values())
    assert_same_bits(args["out"], eager(qt, torch.float32, monkeypatch))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert not native.available()


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, group_size=64),
        QuantSpec(bits=8, granularity="channel"),
        QuantSpec(bits=3, group_size=100),
        QuantSpec(bits=4, group_size=64, grid="nf4"),
        QuantSpec(bits=4, group_size=32, zero_point="float"),
        QuantSpec(bits=2, group_size=24),
        QuantSpec(bits=6, grid="gaussian", group_size=64),
        QuantSpec(bits=5, granularity="tensor"),
    ],
    ids=lambda spec: spec.label,
)
@pytest.mark.parametrize("tokens", [0, 1, 2, 3, 4, 5, 9, 33])
def test_linear_is_fp32_accurate(spec, tokens):
    gen = torch.Generator().manual_seed(tokens)
    qt = quantize(torch.randn(40, 203, generator=gen), spec)  # 203: no group divides it
    x = torch.randn(tokens, 203, generator=gen)
    want = torch.nn.functional.linear(x.double(), qt.dequantize(torch.float32).double())
    got = native.linear(x, qt)
    assert got.dtype == torch.float32 and got.shape == (tokens, 40)
    if tokens == 0:
        return
    scale = want.abs().max().clamp_min(1e-30)
    assert float((got.double() - want).abs().max() / scale) <= 1e-5


@pytest.mark.parametrize("tile_rows", [1, 16, 17, 40, 1000])
@pytest.mark.parametrize("tokens", [0, 1, 7, 70])
def test_linear_tiled_is_fp32_accurate_across_tiles(tile_rows, tokens):
    gen = torch.Generator().manual_seed(tokens + tile_rows)
    qt = quantize(torch.randn(40, 203, generator=gen), QuantSpec(bits=4, group_size=64))
    x = torch.randn(tokens, 203, generator=gen)
    tile = torch.empty(tile_rows * 203)
    got = torch.ops.lowbit_native.linear_tiled(x, *native.weight_args(qt), 40, tile_rows, tile)
    assert got.dtype == torch.float32 and got.shape == (tokens, 40)
    if tokens:
        want = torch.nn.functional.linear(x.double(), qt.dequantize(torch.float32).double())
        assert float((got.double() - want).abs().max() / want.abs().max()) <= 1e-5
    assert torch.equal(native.linear_tiled(x, qt), got) or tile_rows != native.tile_rows(203)
    with pytest.raises(RuntimeError, match="tile_rows must be positive"):
        torch.ops.lowbit_native.linear_tiled(x, *native.weight_args(qt), 40, 0, tile)
    with pytest.raises(RuntimeError, match="tile must be"):
        torch.ops.lowbit_native.linear_tiled(x, *native.weight_args(qt), 40, 1, torch.empty(5))


def test_tile_rows_fit_the_cache_budget():
    assert native.tile_rows(4096) == 256 and native.tile_rows(576) % 16 == 0
    assert native.tile_rows(10**9) == 16
    assert native.tile_rows(576) * 576 * 4 <= native.TILE_BYTES


def test_linear_bad_arguments():
    qt = quantize(torch.randn(16, 64), QuantSpec(bits=4, group_size=32))
    with pytest.raises(RuntimeError, match="x must be contiguous float32"):
        native.linear(torch.randn(2, 64).bfloat16(), qt)
    with pytest.raises(RuntimeError, match="x must be contiguous float32"):
        native.linear(torch.randn(64, 2).t(), qt)
    with pytest.raises(RuntimeError, match="packed shape"):
        native.linear(torch.randn(2, 65), qt)
    meta = quantize(torch.randn(16, 64), QuantSpec(bits=4, group_size=32, layout="dense"))
    meta.packed = meta.packed.to("meta")
    with pytest.raises(RuntimeError, match="do not take"):
        native.linear(torch.randn(2, 64), meta)


def test_operators_agree_with_their_fake_kernels():
    """torch.compile traces the operators through their registered fakes: schemas, shapes and
    aliasing must match the real kernels."""
    qt = quantize(torch.randn(24, 96), QuantSpec(bits=4, group_size=32))
    args = native.weight_args(qt)
    torch.library.opcheck(torch.ops.lowbit_native.linear.default, (torch.randn(3, 96), *args, 24))
    torch.library.opcheck(
        torch.ops.lowbit_native.linear_tiled.default,
        (torch.randn(3, 96), *args, 24, 16, torch.empty(16 * 96)),
    )
    out = torch.empty(24, 96)
    torch.library.opcheck(torch.ops.lowbit_native.dequantize_.default, (*args, 3e38, out))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8, granularity="channel"),
        QuantSpec(bits=8, granularity="tensor", symmetric=True),
        QuantSpec(bits=8, group_size=64),
        QuantSpec(bits=4, group_size=128),
    ],
    ids=lambda spec: spec.label,
)
@pytest.mark.parametrize("tokens", [1, 3])
def test_fused_linear_keeps_float32_accuracy_with_large_zero_points(spec, tokens):
    """All-positive inputs make sum(q x) and z * sum(x) large and close (z ~ 128 at 8 bits):
    the kernel must not cancel the digits away (it sums (q - c) x with c the grid centre)."""
    gen = torch.Generator().manual_seed(1)
    qt = quantize(torch.randn(64, 4096, generator=gen), spec)
    x = torch.rand(tokens, 4096, generator=gen) + 1
    want = torch.nn.functional.linear(x.double(), qt.dequantize(torch.float32).double())
    got = native.linear(x, qt).double()
    assert float((got - want).norm() / want.norm()) <= 5e-6  # F.linear itself: ~6e-7


def test_tiled_output_is_contiguous():
    qt = quantize(torch.randn(64, 128), QuantSpec(bits=4, group_size=64))
    y = native.linear_tiled(torch.randn(10, 128), qt)
    assert y.is_contiguous() and y.shape == (10, 64)


def test_codebook_tables_ignore_the_default_dtype(monkeypatch):
    qt = quantize(torch.randn(16, 64), QuantSpec(bits=4, grid="nf4", group_size=64))
    want = eager(qt, torch.float32, monkeypatch)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert_same_bits(qt.dequantize(torch.float32), want)
    finally:
        torch.set_default_dtype(previous)


def test_without_a_compiler_it_warns_once_and_the_eager_path_serves(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert not native.available()
    assert not native.available()  # decided once: no second warning, no second attempt
    qt = quantize(torch.randn(8, 64), QuantSpec(bits=4, group_size=32))
    assert not native.supports(qt)
    with pytest.raises(RuntimeError, match="do not take"):
        native.linear(torch.randn(2, 64), qt)
    assert qt.dequantize().shape == (8, 64)  # the eager reference


def test_a_failing_build_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="building lowbit_native.so failed"):
        assert not native.available()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no half-written library


def test_dequantize_into_refuses_what_it_cannot_fill():
    qt = quantize(torch.randn(8, 64), QuantSpec(bits=4, group_size=32))
    with pytest.raises(RuntimeError, match="packed shape"):
        native.dequantize_into(qt, torch.empty(8, 32), 3e38)
    with pytest.raises(RuntimeError, match="out must be float32"):
        native.dequantize_into(qt, torch.empty(8, 64, dtype=torch.int32), 3e38)
    qt.packed = qt.packed.to("meta")
    with pytest.raises(RuntimeError, match="do not take"):
        native.dequantize_into(qt, torch.empty(8, 64), 3e38)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "576"])
def test_tile_rows_refuses_bad_widths(bad):
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        native.tile_rows(bad)
