"""``dare``: DARE-Quantization's objective, searched over a range that also clips.

DARE picks, per output channel, the scale minimising

    lambda_weight * mean((w - w_hat)**2) + lambda_entropy * H(w - w_hat)

where ``H = -sum(d * ln(d + 1e-8))`` over the *density* values ``d = count / (n * bin_width)``
of a ``bins``-bin histogram of the residual spanning its own [min, max] (a constant residual
gets the range [r - 1, r + 1], as ``torch.histc`` does). Its candidate scales are
``linspace(max|w| / qmax, max|w|, 20)``: all at or above the absmax scale, so it never clips
and in practice ends at plain absmax rounding. This fit scores the same objective on those
scales (ratios 1 .. span of the absmax fit, ``scales`` of them) *and* on ``clip_candidates``
ratios from ``min_ratio`` to 1, so each block's loss is never above the seed's search. It
serves every grid and zero point (asymmetric specs use the range of ``minmax``) and weights the
error term by importance when given. The core's ``entropy`` fit is the better-posed
generalisation (relative error, entropy in bits of a probability histogram); this one exists so
``lowbit.compat.dare_quant`` reproduces DARE exactly.
"""

from __future__ import annotations

import torch

from lowbit.fit.registry import fit_options, register_fit
from lowbit.fit.search import affine_candidates, as_stored, nearest_values, pick
from lowbit.grids import Grid
from lowbit.spec import QuantSpec

DARE_DEFAULTS = {
    "bins": 128,
    "lambda_weight": 1.0,
    "lambda_entropy": 0.1,
    "scales": 20,
    "clip_candidates": 20,
    "min_ratio": 0.3,
}


def dare_ratios(grid: Grid, spec: QuantSpec, scales: int, clip: int, low: float) -> torch.Tensor:
    """Candidate ratios of the range fit: DARE's ``scales`` from 1 to the grid's span (for the
    symmetric int grid ``linspace(max|w|/qmax, max|w|, scales)`` exactly), then ``clip`` below 1.
    """
    vmin, vmax = grid.value_range(spec.bits)
    span = vmax - grid.center(spec.bits) if spec.symmetric else (vmax - vmin) / 2
    seed = torch.linspace(1.0, max(1.0, span), scales)
    clipping = torch.linspace(low, 1.0, clip + 1)[:-1] if clip else torch.empty(0)
    return torch.cat([seed, clipping])


@register_fit("dare", DARE_DEFAULTS)
def fit_dare(blocks: torch.Tensor, grid: Grid, spec: QuantSpec, weights=None):
    """Least DARE objective over DARE's scales plus clipping ones; see the module docstring.

    Options: ``bins`` (128), ``lambda_weight`` (1.0), ``lambda_entropy`` (0.1), ``scales``
    (20), ``clip_candidates`` (20), ``min_ratio`` (0.3).
    """
    opts = fit_options(spec)
    bins, scales, clip = int(opts["bins"]), int(opts["scales"]), int(opts["clip_candidates"])
    low = float(opts["min_ratio"])
    if not 1 <= bins <= 1 << 16:
        raise ValueError(f"fit 'dare': bins must be in 1..65536, got {bins}")
    if not 1 <= scales <= 10_000 or not 0 <= clip <= 10_000:
        raise ValueError(
            f"fit 'dare': scales must be in 1..10000 and clip_candidates in 0..10000, "
            f"got {scales}, {clip}"
        )
    if not 0.0 < low <= 1.0:
        raise ValueError(f"fit 'dare': min_ratio must be in (0, 1], got {low}")
    for name in ("lambda_weight", "lambda_entropy"):
        if not 0.0 <= float(opts[name]) < float("inf"):
            raise ValueError(f"fit 'dare': {name} must be finite and >= 0, got {opts[name]}")
    ratios = dare_ratios(grid, spec, scales, clip, low)
    raw_scale, raw_zero = affine_candidates(blocks, grid, spec, ratios, 1)
    scale, zero = as_stored(raw_scale, raw_zero, grid, spec)  # scored as they will be stored
    loss = dare_objective(
        blocks,
        weights,
        scale,
        zero,
        grid,
        spec.bits,
        bins,
        float(opts["lambda_weight"]),
        float(opts["lambda_entropy"]),
    )
    # Raw parameters: quantize rounds them for storage, once, to exactly what was scored.
    scale, zero = pick(loss, raw_scale, raw_zero)
    return scale, zero


def density_entropy(residual: torch.Tensor, bins: int) -> torch.Tensor:
    """DARE's ``-sum(d * ln(d + 1e-8))`` over histogram densities of each row of ``residual
    [B, n]`` (float32) -> ``[B]``; see the module docstring."""
    num_blocks, n = residual.shape
    lo, hi = torch.aminmax(residual, dim=-1, keepdim=True)
    flat = hi == lo
    lo = torch.where(flat, lo - 1.0, lo)
    hi = torch.where(flat, hi + 1.0, hi)
    width = hi - lo
    index = ((residual - lo) * (bins / width)).long().clamp_(0, bins - 1)
    index += bins * torch.arange(num_blocks, device=residual.device).unsqueeze(-1)
    counts = torch.bincount(index.reshape(-1), minlength=num_blocks * bins)
    counts = counts.view(num_blocks, bins).to(torch.float32)
    density = counts / (n * (width / bins))
    return -(density * torch.log(density + 1e-8)).sum(-1)


def dare_objective(blocks, weights, scale, zero, grid, bits, bins, lam_w, lam_h):
    """DARE's loss per block and candidate: float32 ``[B, C]`` for ``scale``/``zero [B, C]``."""
    inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
    out = torch.empty_like(scale)
    for c in range(scale.shape[1]):
        z, s = zero[:, c : c + 1], scale[:, c : c + 1]
        values = nearest_values(torch.addcmul(z, blocks, inv[:, c : c + 1]), grid, bits)
        residual = blocks - (values - z) * s
        squared = residual * residual
        if weights is None:
            mse = squared.mean(-1)
        else:
            mse = (squared * weights).sum(-1) / weights.sum(-1).clamp(min=1e-30)
        out[:, c] = lam_w * mse + lam_h * density_entropy(residual, bins)
    # NaN in a block must reach its scale: the histogram above would hide it.
    return torch.where(torch.isfinite(scale), out, torch.full_like(out, float("nan")))
