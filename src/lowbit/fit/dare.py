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

Speed: on the uniform grid a large search runs compiled and pruned. One fused pass measures
every candidate's residual range and squared error; the density entropy is bounded by the
range alone (`entropy_bounds`), so only the candidates that could still win (about a quarter
of them on real weights) have their histograms built. The pick is the same as scoring all.
"""

from __future__ import annotations

import math

import torch

from lowbit.fit import fused
from lowbit.fit.registry import fit_options, float_option, int_option, register_fit
from lowbit.fit.search import affine_candidates, as_stored, pick, restored_values
from lowbit.grids import Grid
from lowbit.spec import QuantSpec

DARE_OPTIONS = {
    "bins": int_option(128, 1, 1 << 16),
    "lambda_weight": float_option(1.0, 0.0, float("inf"), high_open=True),
    "lambda_entropy": float_option(0.1, 0.0, float("inf"), high_open=True),
    "scales": int_option(20, 1, 10_000),
    "clip_candidates": int_option(20, 0, 10_000),
    "min_ratio": float_option(0.3, 0.0, 1.0, low_open=True),
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


@register_fit("dare", DARE_OPTIONS, uses_importance=True)
def fit_dare(blocks: torch.Tensor, grid: Grid, spec: QuantSpec, weights=None):
    """Least DARE objective over DARE's scales plus clipping ones; see the module docstring.

    Options: ``bins`` (128), ``lambda_weight`` (1.0), ``lambda_entropy`` (0.1), ``scales``
    (20), ``clip_candidates`` (20), ``min_ratio`` (0.3).
    """
    opts = fit_options(spec)
    bins, scales, clip = int(opts["bins"]), int(opts["scales"]), int(opts["clip_candidates"])
    low = float(opts["min_ratio"])
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
        spec.symmetric or spec.zero_point == "int",
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
    index = ((residual - lo) * (bins / width)).long().clamp(0, bins - 1)
    index = index + bins * torch.arange(num_blocks, device=residual.device).unsqueeze(-1)
    if torch.compiler.is_compiling():
        # bincount's output size depends on the data, which a compiled graph cannot have.
        counts = torch.zeros(num_blocks * bins, dtype=torch.float32, device=residual.device)
        ones = torch.ones((), dtype=torch.float32, device=residual.device)
        counts.index_put_((index.reshape(-1),), ones.expand(index.numel()), accumulate=True)
    else:
        counts = torch.bincount(index.reshape(-1), minlength=num_blocks * bins)
    counts = counts.view(num_blocks, bins).to(torch.float32)
    density = counts / (n * (width / bins))
    return -(density * torch.log(density + 1e-8)).sum(-1)


def dare_objective(blocks, weights, scale, zero, grid, bits, bins, lam_w, lam_h, int_zero=True):
    """DARE's loss per block and candidate: float32 ``[B, C]`` for ``scale``/``zero [B, C]``
    (``int_zero``: the zeros are whole codes, restored as `quantize` does, round(x / s) + z).

    Large searches on the uniform grid run compiled and pruned (`pruned_objective`); the
    others, and any block holding NaN/Inf, score every candidate eagerly.
    """
    num_blocks, n = blocks.shape
    out = None
    if fused.should_compile(grid, blocks.device, num_blocks * n * scale.shape[1]):
        out = pruned_objective(
            blocks, weights, scale, zero, grid, bits, bins, lam_w, lam_h, int_zero
        )
    if out is None:
        out = torch.empty_like(scale)
        for c in range(scale.shape[1]):
            z, s = zero[:, c : c + 1], scale[:, c : c + 1]
            out[:, c] = pair_objective(
                blocks, weights, s, z, lam_w, lam_h, grid, bits, bins, int_zero
            )
    # NaN in a block must reach its scale: the histogram above would hide it.
    return torch.where(torch.isfinite(scale), out, torch.full_like(out, float("nan")))


def pair_objective(
    blocks, weights, scale, zero, lam_w, lam_h, grid, bits: int, bins: int, int_zero: bool
):
    """DARE's loss of each block ``[P, n]`` under its own ``scale``/``zero [P, 1]`` -> ``[P]``
    (float32); ``lam_w``/``lam_h`` floats or 0-d tensors. Pure tensor code: the compiled
    scorer (`lowbit.fit.fused`) runs it as is, with tensor lambdas (one kernel for all)."""
    # Restored exactly as quantize will store them: a row's loss is then the seed's formula
    # applied to what the layer holds, never a rounding away from it.
    values = restored_values(blocks, scale, zero, grid, bits, int_zero)
    residual = blocks - (values - zero) * scale
    squared = residual * residual
    if weights is None:
        mse = squared.mean(-1)
    else:
        mse = (squared * weights).sum(-1) / weights.sum(-1).clamp(min=1e-30)
    return lam_w * mse + lam_h * density_entropy(residual, bins)


def entropy_bounds(lo, hi, mse, n: int, bins: int, lam_w: float, lam_h: float):
    """(lower, upper) bounds of DARE's loss from a residual's range ``lo``/``hi`` and its mean
    squared error ``mse`` (any shape, float32), without its histogram.

    With bin width ``b = (hi - lo) / bins`` and the histogram's probabilities ``p``, the density
    entropy is ``(H(p) + ln b) / b`` where ``0 <= H(p) <= ln(min(bins, n))``; the ``+1e-8`` inside
    DARE's logarithm lowers it by at most ``1e-8`` per bin.
    """
    flat = hi == lo
    width = torch.where(flat, torch.full_like(lo, 2.0), hi - lo)
    b = width / bins
    log_b = torch.log(b)
    lower, upper = lam_w * mse, lam_w * mse
    if lam_h:  # (0 * -inf would be NaN for residual ranges below ~1e-35)
        lower = lower + lam_h * (log_b / b - bins * 1e-8)
        upper = upper + lam_h * (math.log(min(bins, n)) + log_b) / b
    return lower, upper


def pruned_objective(blocks, weights, scale, zero, grid, bits, bins, lam_w, lam_h, int_zero):
    """`dare_objective` on the uniform grid, compiled, with the histograms only where needed.

    One fused pass gives every candidate's residual range and squared error, hence bounds on
    its loss (`entropy_bounds`); a candidate whose lower bound is above the least upper bound
    of its block cannot win, so it is left at ``+inf`` and only the others are scored exactly.
    Returns float32 ``[B, C]``, or ``None`` if compiling is unavailable.
    """
    num_blocks, n = blocks.shape
    vmin, vmax = grid.value_range(bits)
    stats = fused.residual_stats(blocks, weights, scale, zero, vmin, vmax)
    if stats is None:
        return None
    lo, hi, squared = stats
    norm = float(n) if weights is None else weights.sum(-1, keepdim=True).clamp(min=1e-30)
    lower, upper = entropy_bounds(lo, hi, squared / norm, n, bins, lam_w, lam_h)
    least = upper.amin(-1, keepdim=True)
    # The fused pass and the exact one may round differently: a wide margin keeps every
    # candidate that could win (the bounds of two candidates differ by far more).
    margin = 1e-3 * (least.abs() + lower.abs()) + 1e-6
    keep = (lower <= least + margin) | ~torch.isfinite(lower)
    rows, cands = keep.nonzero(as_tuple=True)
    lambdas = [torch.tensor(float(v), device=blocks.device) for v in (lam_w, lam_h)]
    losses = fused.per_block(
        pair_objective,
        blocks,
        weights,
        rows,
        scale[rows, cands].unsqueeze(-1),
        zero[rows, cands].unsqueeze(-1),
        lambdas,
        (grid, bits, bins, int_zero),
    )
    if losses is None:
        return None
    out = torch.full_like(scale, float("inf"))
    out[rows, cands] = losses
    return out
