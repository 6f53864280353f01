"""``mse``: search clipping ratios (and window offsets) for the least (weighted) squared error."""

from __future__ import annotations

import math

import torch

from lowbit.fit.registry import fit_options, register_fit
from lowbit.fit.search import (
    range_search,
    refine,
)
from lowbit.grids import Grid
from lowbit.spec import QuantSpec

MSE_DEFAULTS = {"candidates": 100, "min_ratio": 0.2, "offsets": 5, "refits": 1}


def check_search_options(opts: dict, fit: str) -> None:
    """Raise ``ValueError`` naming the option if a search setting is out of range."""
    if not 1 <= int(opts["candidates"]) <= 10_000:
        raise ValueError(f"fit {fit!r}: candidates must be in 1..10000, got {opts['candidates']}")
    if not 0.0 < float(opts["min_ratio"]) <= 1.0:
        raise ValueError(f"fit {fit!r}: min_ratio must be in (0, 1], got {opts['min_ratio']}")
    if not 1 <= int(opts.get("offsets", 1)) <= 100:
        raise ValueError(f"fit {fit!r}: offsets must be in 1..100, got {opts['offsets']}")
    if int(opts.get("refits", 0)) < 0:
        raise ValueError(f"fit {fit!r}: refits must be >= 0, got {opts['refits']}")


def ratio_grid(candidates: int, offsets: int, low: float, high: float = 1.0) -> torch.Tensor:
    """``ceil(candidates / offsets)`` ratios from ``high`` down to ``low`` (float32)."""
    count = max(1, math.ceil(candidates / offsets))
    if count == 1:
        return torch.tensor([high])
    return torch.linspace(high, low, count)


@register_fit("mse", MSE_DEFAULTS)
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
    check_search_options(opts, "mse")
    offsets = 1 if spec.symmetric else int(opts["offsets"])
    ratios = ratio_grid(int(opts["candidates"]), offsets, float(opts["min_ratio"]))
    fitted = range_search(blocks, weights, grid, spec, ratios, offsets)
    return refine(blocks, weights, fitted, grid, spec, int(opts["refits"])).result()
