"""Range fits: ``minmax`` (asymmetric) and ``absmax`` (symmetric)."""

from __future__ import annotations

import torch

from lowbit.fit.candidates import block_range
from lowbit.fit.registry import register_fit
from lowbit.grids import Grid
from lowbit.spec import QuantSpec


@register_fit("minmax")
def fit_minmax(blocks: torch.Tensor, grid: Grid, spec: QuantSpec, weights=None):
    """Stretch the grid over ``[min(x, 0), max(x, 0)]`` of each block.

    With ``zero_point="int"`` the range always contains 0 so that the integer zero point lies on
    the grid and 0.0 is restored exactly. The price: a block of one sign (all in [0.5, 1], say)
    spreads the grid over [0, max] and uses only part of it. With ``zero_point="float"`` the
    range is the block's own [min, max]. For a symmetric spec this falls back to ``absmax``.
    """
    if spec.symmetric:
        return fit_absmax(blocks, grid, spec)
    vmin, vmax = grid.value_range(spec.bits)
    # The integer zero point must lie on the grid: the range includes 0. A constant block gets
    # [c, 0] or [0, c] either way, so that only all-zero blocks are left with an empty range.
    lo, width = (t.squeeze(-1) for t in block_range(blocks, spec))
    scale = width / (vmax - vmin)  # 0 for an all-zero block: quantize restores exact zeros
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # NaN stays NaN
    zero = vmin - lo / safe
    return scale, zero


@register_fit("absmax", two_sided=True)
def fit_absmax(blocks: torch.Tensor, grid: Grid, spec: QuantSpec, weights=None):
    """Symmetric: ``scale = max|x| / (vmax - centre)``, zero at the grid's centre.

    Used with an asymmetric spec it still stores a zero point, fixed at the centre.
    """
    vmin, vmax = grid.value_range(spec.bits)
    center = grid.center(spec.bits)
    if vmin >= center:
        raise ValueError(
            f"fit 'absmax' needs a grid with levels on both sides of its centre; grid "
            f"{spec.grid!r} at {spec.bits} bits is one-sided: use fit='minmax' (or 'mse')"
        )
    absmax = blocks.abs().amax(dim=-1)
    scale = absmax / (vmax - center)  # 0 for an all-zero block: quantize restores exact zeros
    zero = None if spec.symmetric else torch.full_like(scale, center)
    return scale, zero
