"""``percentile``: the range between percentiles of the block instead of its extremes."""

from __future__ import annotations

import torch

from lowbit.fit.minmax import fit_absmax, fit_minmax
from lowbit.fit.registry import fit_options, float_option, register_fit
from lowbit.grids import Grid
from lowbit.spec import QuantSpec


@register_fit("percentile", {"percentile": float_option(99.9, 50.0, 100.0, low_open=True)})
def fit_percentile(blocks: torch.Tensor, grid: Grid, spec: QuantSpec, weights=None):
    """``minmax``/``absmax`` on the block clipped to its ``percentile`` range.

    Asymmetric specs use the ``100 - percentile`` and ``percentile`` percentiles of the block
    (linear interpolation between samples), symmetric ones the ``percentile`` percentile of
    ``|x|``; values beyond are clipped to the outermost level. Importance weights are ignored.

    Options: ``percentile`` (99.9, in (50, 100]).
    """
    q = float(fit_options(spec)["percentile"])
    bad = ~torch.isfinite(blocks).all(dim=-1)  # a quantile can step over a lone Inf
    if spec.symmetric:
        high = quantile(blocks.abs(), q / 100.0).unsqueeze(-1)
        scale, zero = fit_absmax(high, grid, spec)
    else:
        ends = torch.stack([quantile(blocks, 1.0 - q / 100.0), quantile(blocks, q / 100.0)], -1)
        scale, zero = fit_minmax(ends, grid, spec)
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    return scale, zero


def quantile(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """The ``p`` quantile of each row of ``blocks [B, n]`` with linear interpolation (as
    ``torch.quantile``, which refuses rows over 2**24 elements): float32 ``[B]``. NaN rows give
    NaN (``kthvalue`` orders NaN last), which the caller turns into a non-finite scale anyway."""
    n = blocks.shape[-1]
    position = p * (n - 1)
    below = int(position)
    above = min(below + 1, n - 1)
    low = torch.kthvalue(blocks, below + 1, dim=-1).values
    if above == below:
        return low
    high = torch.kthvalue(blocks, above + 1, dim=-1).values
    return low + (high - low) * (position - below)
