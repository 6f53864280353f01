"""``percentile``: the range between percentiles of the block instead of its extremes."""

from __future__ import annotations

import torch

from lowbit.fit.minmax import fit_absmax, fit_minmax
from lowbit.fit.registry import fit_options, register_fit
from lowbit.grids import Grid
from lowbit.spec import QuantSpec


@register_fit("percentile", {"percentile": 99.9})
def fit_percentile(blocks: torch.Tensor, grid: Grid, spec: QuantSpec, weights=None):
    """``minmax``/``absmax`` on the block clipped to its ``percentile`` range.

    Asymmetric specs use the ``100 - percentile`` and ``percentile`` percentiles of the block
    (linear interpolation between samples), symmetric ones the ``percentile`` percentile of
    ``|x|``; values beyond are clipped to the outermost level. Importance weights are ignored.

    Options: ``percentile`` (99.9, in (50, 100]).
    """
    q = float(fit_options(spec)["percentile"])
    if not 50.0 < q <= 100.0:
        raise ValueError(f"fit 'percentile': percentile must be in (50, 100], got {q}")
    bad = ~torch.isfinite(blocks).all(dim=-1)  # a quantile can step over a lone Inf
    if spec.symmetric:
        high = torch.quantile(blocks.abs(), q / 100.0, dim=-1, keepdim=True)
        scale, zero = fit_absmax(high, grid, spec)
    else:
        levels = torch.tensor([1.0 - q / 100.0, q / 100.0], device=blocks.device)
        ends = torch.quantile(blocks, levels, dim=-1)
        scale, zero = fit_minmax(ends.transpose(0, 1).contiguous(), grid, spec)
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    return scale, zero
