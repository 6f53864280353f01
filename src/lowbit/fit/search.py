"""Shared machinery of the searching fits: candidate ranges, scoring, least-squares refits.

A block ``x [n]`` with scale ``s`` and zero ``z`` (code units) is restored as
``x_hat = (v - z) * s`` where ``v = nearest(x / s + z)`` is the nearest grid value. Scores are
computed in the normalised domain, ``s**2 * sum(w * (u - v)**2)`` with ``u = x / s + z``, which
equals ``sum(w * (x - x_hat)**2)`` and needs one multiply-add per element instead of two.

Every function is vectorised over blocks ``[B, n]`` and candidates ``[B, C]``; the candidate
loop is the only Python loop, and it walks sub-chunks of the blocks sized to stay in cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.dtypes import FLOAT_DTYPES
from lowbit.fit import fused
from lowbit.fit.candidates import block_range, candidate_grid, candidate_params
from lowbit.grids import Grid
from lowbit.spec import QuantSpec
from lowbit.storage import stored_params

# Elements per sub-chunk in the candidate loop: small enough that the few float32 temporaries
# of one candidate stay in L2, large enough that per-call overhead stays small (measured).
_CACHE_ELEMENTS = 1 << 17


def nearest_values(u: torch.Tensor, grid: Grid, bits: int) -> torch.Tensor:
    """Nearest grid value (float32, same shape) of each normalised value ``u`` (float32)."""
    if grid.codes_are_values:
        vmin, vmax = grid.value_range(bits)
        return u.round().clamp_(vmin, vmax)
    return grid.decode(grid.encode_(u.clone(), bits), bits)


def restored_values(
    blocks: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    grid: Grid,
    bits: int,
    integer_zero: bool,
) -> torch.Tensor:
    """Grid values (float32, like ``blocks [B, n]``) that `lowbit.quantize` encodes ``blocks``
    to under ``scale``/``zero [B, 1]`` (zero in code units), with its exact arithmetic: on the
    uniform grid with an integer zero, ``round(x / s) + z``; otherwise nearest to ``x / s + z``
    (as a multiply by ``1 / s``). The scorers use the cheaper form; this one is for searches
    that promise a result exactly as good as a reference's (``dare``)."""
    if integer_zero and grid.codes_are_values:
        vmin, vmax = grid.value_range(bits)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        quotient = torch.where(scale > 0, blocks / safe, torch.zeros_like(blocks))
        return (quotient.round() + zero).clamp(vmin, vmax)
    inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
    return nearest_values(torch.addcmul(zero, blocks, inv), grid, bits)


def affine_candidates(
    blocks: torch.Tensor, grid: Grid, spec: QuantSpec, ratios: torch.Tensor, offsets: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidate (scale, zero) per block, float32 ``[B, C]`` (zero ``None`` if symmetric).

    Symmetric specs scale the block's ``max |x|`` by each ratio. Asymmetric ones take the
    block's range (`block_range`), make a window of ``ratio`` times its width and slide it
    across ``offsets`` evenly spaced positions (both ends clipped by the same amount at the
    middle one); ratios above 1 widen the range instead. The first candidate is the plain
    range fit when the first ratio is 1, so a search never ends worse.
    """
    low, width = block_range(blocks, spec)
    ratio, position = candidate_grid(ratios, offsets)
    vmin, vmax = grid.value_range(spec.bits)
    scale, zero = candidate_params(
        low,
        width,
        ratio.to(blocks.device),
        position.to(blocks.device),
        vmin,
        vmax,
        grid.center(spec.bits),
        spec.symmetric,
        spec.zero_point == "int",
    )
    return scale, None if spec.symmetric else zero


def as_stored(
    scale: torch.Tensor, zero: torch.Tensor | None, grid: Grid, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero in code units float32) exactly as quantize will store them."""
    vmin, vmax = grid.value_range(spec.bits)
    stored, zero_codes, _ = stored_params(
        scale, zero, vmin, vmax, grid.center(spec.bits), spec, FLOAT_DTYPES[spec.scale_dtype]
    )
    return stored.to(torch.float32), zero_codes


def squared_errors(
    blocks: torch.Tensor,
    weights: torch.Tensor | None,
    scale: torch.Tensor,
    zero: torch.Tensor,
    grid: Grid,
    bits: int,
) -> torch.Tensor:
    """``sum(w * (x - x_hat)**2)`` per block and candidate: float32 ``[B, C]``.

    ``scale``/``zero`` are float32 ``[B, C]`` (zero in code units). NaN in a block gives NaN.
    """
    num_blocks, n = blocks.shape
    inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
    out = torch.empty_like(scale)
    step = max(1, _CACHE_ELEMENTS // max(1, n))
    for b0 in range(0, num_blocks, step):
        b1 = min(num_blocks, b0 + step)
        x = blocks[b0:b1]
        w = None if weights is None else weights[b0:b1]
        for c in range(scale.shape[1]):
            u = torch.addcmul(zero[b0:b1, c : c + 1], x, inv[b0:b1, c : c + 1])
            d = nearest_values(u, grid, bits).sub_(u)
            d.mul_(d)
            if w is not None:
                d.mul_(w)
            out[b0:b1, c] = d.sum(dim=-1)
    return out * scale * scale


def best_candidate(
    blocks: torch.Tensor,
    weights: torch.Tensor | None,
    scale: torch.Tensor,
    zero: torch.Tensor,
    grid: Grid,
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(least error float32 ``[B]``, its candidate index int64 ``[B]``) over candidates
    ``scale``/``zero [B, C]``: `squared_errors` then the minimum, fused and compiled for the
    uniform grid on large searches (`lowbit.fit.fused`). NaN in a block gives a NaN error."""
    num_blocks, n = blocks.shape
    if fused.should_compile(grid, blocks.device, num_blocks * n * max(scale.shape[1], 16)):
        inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
        vmin, vmax = grid.value_range(bits)
        result = fused.uniform_best(blocks, weights, inv, zero, vmin, vmax)
        if result is not None:
            # A block holding NaN/Inf has non-finite candidates already (its range is), so
            # whichever index wins, its scale carries the NaN/Inf on to quantize's check.
            return result
    errors = squared_errors(blocks, weights, scale, zero, grid, bits)
    index = errors.argmin(dim=-1)
    return errors.gather(-1, index.unsqueeze(-1)).squeeze(-1), index


def pick(errors: torch.Tensor, *params: torch.Tensor | None) -> list[torch.Tensor | None]:
    """For each block the candidate of least error (first on ties): params ``[B, C]`` -> ``[B]``.

    A NaN error (a block holding NaN/Inf) is picked, so the NaN reaches the scale.
    """
    best = errors.argmin(dim=-1, keepdim=True)
    return [None if p is None else p.gather(-1, best).squeeze(-1) for p in params]


@dataclass
class Fitted:
    """Per-block parameters of a search, float32 ``[B]``: ``raw`` as fitted (what a fit
    returns: `lowbit.quantize` rounds it for storage exactly once) and ``stored`` as that
    rounding makes them (what was scored), with the squared ``error`` as stored."""

    raw_scale: torch.Tensor
    raw_zero: torch.Tensor | None
    scale: torch.Tensor
    zero: torch.Tensor
    error: torch.Tensor

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fit's return value: the raw parameters."""
        return self.raw_scale, self.raw_zero


def score_raw(blocks, weights, scale, zero, grid, spec) -> Fitted:
    """Round one raw parameter set (``[B]`` each, zero ``None`` if symmetric) for storage and
    score it as stored."""
    stored_scale, stored_zero = as_stored(scale, zero, grid, spec)
    error, _ = best_candidate(
        blocks, weights, stored_scale[:, None], stored_zero[:, None], grid, spec.bits
    )
    return Fitted(scale, zero, stored_scale, stored_zero, error)


def keep_better(old: Fitted, new: Fitted) -> Fitted:
    """Per block, whichever of ``old`` and ``new`` has the lower error as stored (old on ties)."""
    better = new.error < old.error

    def pick(a, b):
        return None if a is None else torch.where(better, b, a)

    return Fitted(
        pick(old.raw_scale, new.raw_scale),
        pick(old.raw_zero, new.raw_zero),
        pick(old.scale, new.scale),
        pick(old.zero, new.zero),
        pick(old.error, new.error),
    )


def range_search(
    blocks: torch.Tensor,
    weights: torch.Tensor | None,
    grid: Grid,
    spec: QuantSpec,
    ratios: torch.Tensor,
    offsets: int,
) -> Fitted:
    """Least-error window of each block among ``ratios x offsets`` (`affine_candidates`), every
    candidate scored as stored (scale in ``scale_dtype``, zero rounded), the plain range fit
    first (so it wins ties). The uniform grid's large searches run fused and compiled without
    materialising the ``[B, C]`` candidates."""
    low, width = block_range(blocks, spec)
    ratio, position = candidate_grid(ratios, offsets)
    ratio, position = ratio.to(blocks.device), position.to(blocks.device)
    vmin, vmax = grid.value_range(spec.bits)
    shape = grid.value_range(spec.bits) + (grid.center(spec.bits), spec.symmetric)
    int_zero = spec.zero_point == "int"
    index = None
    num_blocks, n = blocks.shape
    if fused.should_compile(grid, blocks.device, num_blocks * n * max(len(ratio), 16)):
        dtype = FLOAT_DTYPES[spec.scale_dtype]
        result = fused.range_best(
            blocks, weights, low, width, ratio, position, *shape, spec.zero_point, dtype
        )
        index = None if result is None else result[1]
    if index is None:
        scale, zero = candidate_params(low, width, ratio, position, *shape, int_zero)
        scale, zero = as_stored(scale, None if spec.symmetric else zero, grid, spec)
        _, index = best_candidate(blocks, weights, scale, zero, grid, spec.bits)
    best = candidate_params(
        low, width, ratio[index].unsqueeze(-1), position[index].unsqueeze(-1), *shape, int_zero
    )
    scale, zero = best[0].squeeze(-1), None if spec.symmetric else best[1].squeeze(-1)
    return score_raw(blocks, weights, scale, zero, grid, spec)


def least_squares_refit(
    blocks: torch.Tensor,
    weights: torch.Tensor | None,
    scale: torch.Tensor,
    zero: torch.Tensor,
    grid: Grid,
    spec: QuantSpec,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each block's codes and solve for the scale (and offset) that best restore them.

    With a float zero point both the scale and the offset are free (a weighted linear
    regression of ``target`` on the code values); with an integer zero point or a symmetric
    spec only the scale is (the zero stays where it is). ``target`` defaults to ``blocks``
    (the half-quadratic fit passes the weights minus their sparse error). Blocks whose fit is
    degenerate (one code only, non-positive scale) keep their parameters. Returns float32
    ``[B]`` scale and zero in code units.
    """
    target = blocks if target is None else target
    inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale)).unsqueeze(-1)
    v = nearest_values(torch.addcmul(zero.unsqueeze(-1), blocks, inv), grid, spec.bits)
    w = torch.ones_like(blocks) if weights is None else weights
    sw = w.sum(-1)
    if not spec.symmetric and spec.zero_point == "float":
        wv = w * v
        sv, svv = wv.sum(-1), (wv * v).sum(-1)
        sx, sxv = (w * target).sum(-1), (wv * target).sum(-1)
        det = sw * svv - sv * sv
        ok = det > 1e-12 * (sw * svv).clamp(min=1e-30)
        safe = torch.where(ok, det, torch.ones_like(det))
        a = (sw * sxv - sv * sx) / safe
        b = (sx - a * sv) / sw.clamp(min=1e-30)
        ok &= a > 0
        safe_a = torch.where(ok, a, torch.ones_like(a))
        return torch.where(ok, a, scale), torch.where(ok, -b / safe_a, zero)
    centred = v - zero.unsqueeze(-1)
    wc = w * centred
    denominator = (wc * centred).sum(-1)
    a = (wc * target).sum(-1) / torch.where(denominator > 0, denominator, torch.ones_like(sw))
    ok = (denominator > 0) & (a > 0)
    return torch.where(ok, a, scale), zero


def refine(
    blocks: torch.Tensor,
    weights: torch.Tensor | None,
    fitted: Fitted,
    grid: Grid,
    spec: QuantSpec,
    rounds: int,
) -> Fitted:
    """Alternate least-squares refits (from the stored parameters' codes) and re-encoding
    ``rounds`` times, keeping per block the better of old and new as stored (so the error
    never rises)."""
    for _ in range(rounds):
        scale, zero = least_squares_refit(blocks, weights, fitted.scale, fitted.zero, grid, spec)
        new = score_raw(blocks, weights, scale, None if spec.symmetric else zero, grid, spec)
        if not (new.error < fitted.error).any():
            break
        fitted = keep_better(fitted, new)
    return fitted


def nearest_codes(u: torch.Tensor, grid: Grid, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(code index int64 ``0 .. 2**bits - 1``, grid value float32) nearest to each ``u``."""
    codes = grid.encode_(u.clone(), bits).long()
    return codes, grid.decode(codes, bits)
