"""Storage layouts: every registered layout round-trips, sizes are exact, specs resolve them."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.grids import CodebookGrid, available_grids, get_grid
from lowbit.grids import registry as grid_registry
from lowbit.layouts import available_layouts, get_layout, register_layout


def widths(name: str) -> list[tuple[int, int]]:
    """(bits, levels) pairs the layout takes: every width, each with its largest level count."""
    layout = get_layout(name)
    pairs = []
    for bits in range(1, 9):
        for levels in (1 << bits, 3):
            if levels <= 1 << bits:
                try:
                    layout.check(bits, levels)
                except ValueError:
                    continue
                pairs.append((bits, levels))
                break
    return pairs


CASES = [(name, bits, levels) for name in available_layouts() for bits, levels in widths(name)]


def test_the_registry_holds_dense_and_base3():
    assert {"dense", "base3"} <= set(available_layouts())
    assert all(pairs for pairs in map(widths, available_layouts()))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize(("name", "bits", "levels"), CASES)
def test_pack_unpack_round_trip(name, bits, levels, data):
    layout = get_layout(name)
    rows = data.draw(st.integers(0, 4))
    cols = data.draw(st.integers(0, 70))
    n = rows * cols
    values = data.draw(st.lists(st.integers(0, levels - 1), min_size=n, max_size=n))
    codes = torch.tensor(values, dtype=torch.uint8).view(rows, cols)
    packed = layout.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (rows, layout.row_bytes(cols, bits))
    assert torch.equal(layout.unpack(packed, bits, cols), codes)
    into = torch.empty(rows, cols, dtype=torch.float32)
    assert torch.equal(layout.unpack_into(packed, bits, into), codes.float())
    # Rows are independent: a row slice unpacks to the same codes.
    if rows > 1:
        assert torch.equal(layout.unpack(packed[1:], bits, cols), codes[1:])


@pytest.mark.parametrize(("name", "bits", "levels"), CASES)
def test_unpack_refuses_rows_of_the_wrong_length_and_dtype(name, bits, levels):
    layout = get_layout(name)
    packed = layout.pack(torch.zeros(2, 20, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bytes"):
        layout.unpack(torch.zeros(2, packed.shape[1] + 1, dtype=torch.uint8), bits, 20)
    with pytest.raises(TypeError):
        layout.unpack(packed.to(torch.int32), bits, 20)
    with pytest.raises(TypeError):
        layout.pack(torch.zeros(2, 20, dtype=torch.int64), bits)


def test_base3_stores_five_codes_per_byte():
    base3 = get_layout("base3")
    assert [base3.row_bytes(n, 2) for n in (0, 1, 5, 6, 10, 576)] == [0, 1, 1, 2, 2, 116]
    codes = torch.tensor([[2, 2, 2, 2, 2, 1, 0, 0, 0, 0, 1]], dtype=torch.uint8)
    packed = base3.pack(codes, 2)
    assert packed.tolist() == [[242, 1, 1]]  # 2 + 6 + 18 + 54 + 162; digits least first
    # Bytes no save writes (243..255) still decode to codes 0..2, never an index past a table.
    assert int(base3.unpack(torch.arange(243, 256, dtype=torch.uint8)[:, None], 2, 5).max()) <= 2


def test_base3_refuses_grids_with_more_than_three_levels():
    with pytest.raises(ValueError, match="base3.*at most 3 levels"):
        lowbit.QuantSpec(bits=2, layout="base3")
    with pytest.raises(ValueError, match="unknown layout 'base5'"):
        lowbit.QuantSpec(bits=4, layout="base5")
    with pytest.raises(TypeError, match="layout"):
        lowbit.QuantSpec(bits=4, layout=3)


def test_register_layout_refuses_duplicates_and_nameless():
    with pytest.raises(ValueError, match="already registered"):
        register_layout(get_layout("dense"))
    with pytest.raises(TypeError, match="name"):
        register_layout(object())


@pytest.mark.parametrize("grid", available_grids())
def test_every_grid_names_a_layout_that_holds_its_codes(grid):
    g = get_grid(grid)
    for bits in range(g.min_bits, g.max_bits + 1):
        # (Exact level counts up to 4 bits: wider Lloyd-Max tables take seconds to compute.)
        levels = g.level_count(bits) if bits <= 4 else 1 << bits
        get_layout(g.preferred_layout(bits)).check(bits, levels)
        assert lowbit.QuantSpec(bits=bits, grid=grid, zero_point="float").layout == (
            g.preferred_layout(bits)
        )


def test_specs_saved_before_layouts_read_as_dense():
    spec = lowbit.QuantSpec(bits=4, group_size=32)
    old = spec.to_dict()
    del old["layout"]
    assert lowbit.QuantSpec.from_dict(old) == spec and spec.layout == "dense"


@pytest.fixture
def ternary(monkeypatch):
    """A three-level codebook registered for one test (the ternary grid is a later issue)."""
    grid = CodebookGrid("test-ternary", lambda bits: torch.tensor([-1.0, 0.0, 1.0]), (2, 2))
    monkeypatch.setitem(grid_registry._GRIDS, grid.name, grid)
    return grid.name


def test_quantize_through_base3_matches_dense_at_1_6_bits(ternary, tmp_path):
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    dense = lowbit.QuantSpec(bits=2, grid=ternary, group_size=32, symmetric=True)
    base3 = lowbit.QuantSpec(bits=2, grid=ternary, group_size=32, symmetric=True, layout="base3")
    qd, qb = lowbit.quantize(w, dense), lowbit.quantize(w, base3)
    assert torch.equal(qd.codes(), qb.codes())
    assert torch.equal(qd.dequantize(), qb.dequantize())
    assert qb.packed.shape == (8, math.ceil(96 / 5))
    assert qb.bits_per_weight == pytest.approx(8 * 20 / 96 + 16 / 32)  # exact: 1.667 + 0.5
    # A layer and a checkpoint carry the layout too.
    model = torch.nn.Sequential(torch.nn.Linear(96, 8))
    model[0].weight.data = w
    lowbit.quantize_model(model, base3, progress=False)
    x = torch.randn(3, 96)
    expected = model(x)
    lowbit.save(model, tmp_path / "t")
    loaded = lowbit.load(tmp_path / "t", torch.nn.Sequential(torch.nn.Linear(96, 8)))
    assert loaded[0].spec.layout == "base3"
    assert torch.equal(loaded(x), expected)
