"""``mse``: search clipping ratios (and window offsets) for the least (weighted) squared error."""

from __future__ import annotations

import math

import torch

from lowbit.fit.registry import fit_options, float_option, int_option, register_fit
from lowbit.fit.search import (
    range_search,
    refine,
)
from lowbit.grids import Grid
from lowbit.spec import QuantSpec

# The settings every window search shares (``entropy`` declares them too).
CANDIDATES = int_option(100, 1, 10_000)
MIN_RATIO = float_option(0.2, 0.0, 1.0, low_open=True)
OFFSETS = int_option(5, 1, 100)

MSE_OPTIONS = {
    "candidates": CANDIDATES,
    "min_ratio": MIN_RATIO,
    "offsets": OFFSETS,
    "refits": int_option(1, 0),
}


def ratio_grid(candidates: int, offsets: int, low: float, high: float = 1.0) -> torch.Tensor:
    """``ceil(candidates / offsets)`` ratios from ``high`` down to ``low`` (float32)."""
    count = max(1, math.ceil(candidates / offsets))
    if count == 1:
        return torch.tensor([high])
    return torch.linspace(high, low, count)


@register_fit("mse", MSE_OPTIONS, uses_importance=True)
def fit_mse(blocks: torch.Tensor, grid: Grid, spec: QuantSpec, weights=None):
    """Least squared error over ``candidates`` shrunken ranges, then least-squares refits.

    Symmetric specs try ``candidates`` ratios of ``max |x|`` from 1 down to ``min_ratio``.
    Asymmetric ones try ``candidates / offsets`` window widths times ``offsets`` window positions
    across the block's range (clipping more of the low or the high tail). Every candidate is
    scored as it will be stored (integer zero rounded, scale in ``scale_dtype``), with the
    importance ``weights`` when given. ``refits`` rounds of least-squares refitting then solve
    for the scale (and, with a float zero point, the offset) that best restore the chosen codes,
    kept only where they lower the error. The plain range fit is candidate 0, so the result is
    never worse than ``minmax``/``absmax``.

    Options: ``candidates`` (100), ``min_ratio`` (0.2), ``offsets`` (5, asymmetric only),
    ``refits`` (1).
    """
    opts = fit_options(spec)
    offsets = 1 if spec.symmetric else int(opts["offsets"])
    ratios = ratio_grid(int(opts["candidates"]), offsets, float(opts["min_ratio"]))
    fitted = range_search(blocks, weights, grid, spec, ratios, offsets)
    return refine(blocks, weights, fitted, grid, spec, int(opts["refits"])).result()
