"""``entropy``: trade reconstruction error against the entropy of the codes or the residual.

DARE's objective, generalised. Each block picks, among candidate ranges, the one minimising

    sum(w * (x - x_hat)**2) / sum(w * x**2)  +  entropy_weight * H

where ``H`` is an entropy in bits of a proper probability histogram: of the block's codes
(``source="codes"``, the size the codes would take after entropy coding) or of its residual
``x - x_hat`` in ``bins`` bins (``source="residual"``, DARE's idea: prefer structured,
low-information error). The error term is relative, so one ``entropy_weight`` means the same on
every layer: it is the relative squared error the caller would pay to save one bit per weight.
Candidates run from ``min_ratio`` to ``max_ratio`` times the block's range: above 1 the range
widens, fewer levels are used and the codes' entropy falls.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lowbit.entropy import block_code_entropy, block_histogram_entropy
from lowbit.fit.mse import CANDIDATES, MIN_RATIO, OFFSETS, ratio_grid
from lowbit.fit.registry import (
    choice_option,
    fit_options,
    float_option,
    int_option,
    register_fit,
)
from lowbit.fit.search import affine_candidates, as_stored, nearest_codes, pick
from lowbit.grids import Grid
from lowbit.spec import QuantSpec

ENTROPY_OPTIONS = {
    "entropy_weight": float_option(0.01, 0.0),
    "source": choice_option("codes", ("codes", "residual")),
    "bins": int_option(32, 2, 1 << 16),
    "candidates": replace(CANDIDATES, default=48),
    "offsets": replace(OFFSETS, default=3),
    "min_ratio": replace(MIN_RATIO, default=0.3),
    "max_ratio": float_option(2.0, 1.0, 1000.0),
}


@register_fit("entropy", ENTROPY_OPTIONS, uses_importance=True)
def fit_entropy(blocks: torch.Tensor, grid: Grid, spec: QuantSpec, weights=None):
    """Least relative error plus ``entropy_weight`` times the entropy; see the module docstring.

    Options: ``entropy_weight`` (0.01, >= 0), ``source`` (``"codes"`` or ``"residual"``),
    ``bins`` (32, for the residual), ``candidates`` (48), ``offsets`` (3), ``min_ratio`` (0.3),
    ``max_ratio`` (2.0).
    """
    opts = fit_options(spec)
    lam, source, bins = float(opts["entropy_weight"]), opts["source"], int(opts["bins"])
    high = float(opts["max_ratio"])
    offsets = 1 if spec.symmetric else int(opts["offsets"])
    low = float(opts["min_ratio"])
    count = int(opts["candidates"])
    # Ratio 1 (the plain range fit) first, then the rest of [low, high].
    ratios = torch.cat([torch.ones(1), ratio_grid(max(1, count - offsets), offsets, low, high)])
    raw_scale, raw_zero = affine_candidates(blocks, grid, spec, ratios, offsets)
    scale, zero = as_stored(raw_scale, raw_zero, grid, spec)  # scored as they will be stored
    loss = objective(blocks, weights, scale, zero, grid, spec.bits, lam, source, bins)
    # Raw parameters: quantize rounds them for storage, once, to exactly what was scored.
    scale, zero = pick(loss, raw_scale, raw_zero)
    return scale, zero


def objective(blocks, weights, scale, zero, grid, bits, lam, source, bins) -> torch.Tensor:
    """Relative weighted squared error + ``lam`` * entropy (bits) per block and candidate:
    float32 ``[B, C]`` for candidates ``scale``/``zero`` ``[B, C]``."""
    energy = (blocks * blocks if weights is None else weights * blocks * blocks).sum(-1)
    energy = torch.where(energy > 0, energy, torch.ones_like(energy))
    inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
    out = torch.empty_like(scale)
    for c in range(scale.shape[1]):
        u = torch.addcmul(zero[:, c : c + 1], blocks, inv[:, c : c + 1])
        codes, values = nearest_codes(u, grid, bits)
        residual = blocks - (values - zero[:, c : c + 1]) * scale[:, c : c + 1]
        squared = residual * residual
        if weights is not None:
            squared = squared * weights
        if source == "codes":
            entropy = block_code_entropy(codes, 1 << bits)
        else:
            entropy = block_histogram_entropy(residual, bins)
        out[:, c] = squared.sum(-1) / energy + lam * entropy
    # NaN in a block must reach its scale: the histograms above would hide it.
    return torch.where(torch.isfinite(scale), out, torch.full_like(out, float("nan")))
