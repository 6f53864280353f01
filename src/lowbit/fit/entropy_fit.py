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

import torch

from lowbit.entropy import block_code_entropy, block_histogram_entropy
from lowbit.fit.mse import check_search_options, ratio_grid
from lowbit.fit.registry import fit_options, register_fit
from lowbit.fit.search import affine_candidates, as_stored, nearest_codes, pick
from lowbit.grids import Grid
from lowbit.spec import QuantSpec

ENTROPY_DEFAULTS = {
    "entropy_weight": 0.01,
    "source": "codes",
    "bins": 32,
    "candidates": 48,
    "offsets": 3,
    "min_ratio": 0.3,
    "max_ratio": 2.0,
}


@register_fit("entropy", ENTROPY_DEFAULTS)
def fit_entropy(blocks: torch.Tensor, grid: Grid, spec: QuantSpec, weights=None):
    """Least relative error plus ``entropy_weight`` times the entropy; see the module docstring.

    Options: ``entropy_weight`` (0.01, >= 0), ``source`` (``"codes"`` or ``"residual"``),
    ``bins`` (32, for the residual), ``candidates`` (48), ``offsets`` (3), ``min_ratio`` (0.3),
    ``max_ratio`` (2.0).
    """
    opts = fit_options(spec)
    check_search_options(opts, "entropy")
    lam, source, bins = float(opts["entropy_weight"]), opts["source"], int(opts["bins"])
    if lam < 0:
        raise ValueError(f"fit 'entropy': entropy_weight must be >= 0, got {lam}")
    if source not in ("codes", "residual"):
        raise ValueError(f"fit 'entropy': source must be 'codes' or 'residual', got {source!r}")
    if not 2 <= bins <= 1 << 16:
        raise ValueError(f"fit 'entropy': bins must be in 2..65536, got {bins}")
    high = float(opts["max_ratio"])
    if not 1.0 <= high <= 1000.0:
        raise ValueError(f"fit 'entropy': max_ratio must be in [1, 1000], got {high}")
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
