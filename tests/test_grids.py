"""Every registered grid, whatever it is: its declared members agree with what it does.

Parametrized over the registry, so a newly registered grid is covered without editing a list.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.grids import available_grids, get_grid
from lowbit.grids.registry import REQUIRED, register_grid


def exact_widths(name: str) -> list[int]:
    """Widths whose levels are cheap to build (wide Lloyd-Max tables take seconds)."""
    grid = get_grid(name)
    return [bits for bits in range(grid.min_bits, grid.max_bits + 1) if bits <= 4]


CASES = [(name, bits) for name in available_grids() for bits in exact_widths(name)]


@pytest.mark.parametrize(("name", "bits"), CASES)
def test_every_code_decodes_and_encodes_back(name, bits):
    grid = get_grid(name)
    count = grid.level_count(bits)
    assert 2 <= count <= 1 << bits
    codes = torch.arange(count, dtype=torch.uint8)
    values = grid.decode(codes, bits)
    # Sorted; equal neighbours only as fp4's +0 and -0 (bitsandbytes' table has both).
    assert values.dtype == torch.float32 and torch.all(values[1:] >= values[:-1])
    assert (float(values[0]), float(values[-1])) == pytest.approx(grid.value_range(bits))
    again = grid.encode_(values.clone(), bits)
    assert torch.equal(grid.decode(again, bits), values)
    if grid.codes_are_values:
        assert torch.equal(values, codes.float())


@pytest.mark.parametrize(("name", "bits"), CASES)
def test_quantize_with_the_grids_natural_symmetry(name, bits):
    spec = lowbit.QuantSpec(bits=bits, grid=name, group_size=32)
    try:
        get_grid(name).check_spec(spec)
    except ValueError:  # a one-sided codebook: only with a float zero point
        spec = lowbit.QuantSpec(bits=bits, grid=name, group_size=32, zero_point="float")
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(bits))
    qt = lowbit.quantize(w, spec)
    assert int(qt.codes().max()) < get_grid(name).level_count(bits)
    restored = qt.dequantize()
    # Even at 2 bits the restored weights carry most of the signal.
    assert (restored - w).norm() < 0.75 * w.norm()


def test_a_grid_missing_a_declared_member_is_refused():
    class Partial:
        name = "test-partial"

        def decode(self, codes, bits):
            return codes.float()

    with pytest.raises(TypeError, match="codes_are_values"):
        register_grid(Partial())
    assert "test-partial" not in available_grids()
    assert {"codes_are_values", "level_count", "preferred_layout"} <= set(REQUIRED)
