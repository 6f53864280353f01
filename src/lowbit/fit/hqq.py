"""``hqq``: half-quadratic optimisation of scale and zero point under a sparsity-promoting norm.

The idea is HQQ's (Badri & Shaji, 2023): minimise ``||x - x_hat||_p`` with ``p < 1``, which
tolerates a few large errors (outliers) in exchange for small errors everywhere else, by
splitting it with an auxiliary error ``e``: alternately (1) ``e = shrink_p(x - x_hat)``, the
generalised soft-threshold that keeps only errors too large to be worth fixing, and (2) the
least-squares fit of the block's parameters to ``x - e`` with the codes fixed, then re-encode.
The penalty ``beta`` grows by ``kappa`` each iteration.

Where HQQ updates the zero point only, this fit also updates the scale (``update_scale``), and
it works with every grid (codebooks too), integer zero points (rounded each iteration),
symmetric specs (scale only) and importance weights. Each block keeps the parameters of its
lowest weighted squared error over the iterations, so it never ends worse than ``minmax``.
"""

from __future__ import annotations

import torch

from lowbit.fit.minmax import fit_absmax, fit_minmax
from lowbit.fit.registry import fit_options, register_fit
from lowbit.fit.search import (
    as_stored,
    best_candidate,
    least_squares_refit,
    nearest_values,
    to_fit_result,
)
from lowbit.grids import Grid
from lowbit.spec import QuantSpec

HQQ_DEFAULTS = {
    "iterations": 20,
    "lp_norm": 0.7,
    "beta": 10.0,
    "kappa": 1.01,
    "update_scale": True,
}


def shrink_lp(error: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-threshold: ``sign(e) * relu(|e| - |e|**(p - 1) / beta)`` (float32)."""
    magnitude = error.abs()
    return error.sign() * torch.relu(magnitude - (magnitude + 1e-8).pow(p - 1.0) / beta)


@register_fit("hqq", HQQ_DEFAULTS)
def fit_hqq(blocks: torch.Tensor, grid: Grid, spec: QuantSpec, weights=None):
    """Half-quadratic fit starting from the range fit; see the module docstring.

    Options: ``iterations`` (20), ``lp_norm`` (0.7, in (0, 1]), ``beta`` (10.0), ``kappa``
    (1.01), ``update_scale`` (True).
    """
    opts = fit_options(spec)
    iterations, p = int(opts["iterations"]), float(opts["lp_norm"])
    beta, kappa = float(opts["beta"]), float(opts["kappa"])
    if not 0 <= iterations <= 10_000:
        raise ValueError(f"fit 'hqq': iterations must be in 0..10000, got {iterations}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"fit 'hqq': lp_norm must be in (0, 1], got {p}")
    if beta <= 0 or kappa <= 0:
        raise ValueError(f"fit 'hqq': beta and kappa must be > 0, got {beta}, {kappa}")
    start = fit_absmax if spec.symmetric else fit_minmax
    scale, zero = start(blocks, grid, spec)
    scale, zero = as_stored(scale, zero, grid, spec)
    best_scale, best_zero = scale, zero
    best_error = _error(blocks, weights, scale, zero, grid, spec)
    # A symmetric block has no zero to move: there the scale is the only free parameter.
    free_scale = bool(opts["update_scale"]) or spec.symmetric
    for _ in range(iterations):
        inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale)).unsqueeze(-1)
        values = nearest_values(torch.addcmul(zero.unsqueeze(-1), blocks, inv), grid, spec.bits)
        restored = (values - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
        target = blocks - shrink_lp(blocks - restored, beta, p)
        if free_scale:
            scale, new_zero = least_squares_refit(
                blocks, weights, scale, zero, grid, spec, target=target
            )
        else:
            new_zero = _zero_only(target, values, scale, weights)
        zero = zero if spec.symmetric else new_zero
        scale, zero = as_stored(scale, None if spec.symmetric else zero, grid, spec)
        error = _error(blocks, weights, scale, zero, grid, spec)
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_error = torch.where(better, error, best_error)
        beta *= kappa
    return to_fit_result(best_scale, best_zero, grid, spec)


def _zero_only(target, values, scale, weights):
    """HQQ's own update: the (weighted) mean of ``v - target / scale`` per block."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    shift = values - target / safe
    if weights is None:
        return shift.mean(-1)
    return (shift * weights).sum(-1) / weights.sum(-1).clamp(min=1e-30)


def _error(blocks, weights, scale, zero, grid, spec):
    return best_candidate(blocks, weights, scale[:, None], zero[:, None], grid, spec.bits)[0]
