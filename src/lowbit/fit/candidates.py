"""Candidate ranges of the searching fits: each block's range, and windows over it.

Pure tensor arithmetic shared by the eager scorer (`lowbit.fit.search`) and the compiled one
(`lowbit.fit.fused`), so both score exactly the same candidates.
"""

from __future__ import annotations

import torch

from lowbit.spec import QuantSpec


def block_range(blocks: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(low end, width) of each block's range fit, float32 ``[B, 1]``.

    Symmetric specs: (``-max|x|``, ``max|x|``; only the width is used). Asymmetric ones: the
    block's [min, max] (containing 0 for an integer zero point, as ``minmax``; a constant block
    is widened to include 0).
    """
    if spec.symmetric:
        absmax = blocks.abs().amax(dim=-1, keepdim=True)
        return -absmax, absmax
    lo, hi = torch.aminmax(blocks, dim=-1, keepdim=True)
    if spec.zero_point == "int":
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    else:
        constant = lo == hi
        lo = torch.where(constant, lo.clamp(max=0.0), lo)
        hi = torch.where(constant, hi.clamp(min=0.0), hi)
    return lo, hi - lo


def candidate_grid(ratios: torch.Tensor, offsets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio, position) float32 ``[C]`` for ``ratios x offsets`` windows, ratio-major;
    one offset means the centred window (position 0.5)."""
    ratios = ratios.to(torch.float32)
    positions = torch.linspace(0.0, 1.0, offsets) if offsets > 1 else torch.full((1,), 0.5)
    return ratios.repeat_interleave(len(positions)), positions.repeat(len(ratios))


def candidate_params(
    low: torch.Tensor,
    width: torch.Tensor,
    ratio: torch.Tensor,
    position: torch.Tensor,
    vmin: float,
    vmax: float,
    center: float,
    symmetric: bool,
    int_zero: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero in code units) of windows ``ratio``/``position`` over ranges ``low``/
    ``width`` (broadcast, float32). Symmetric: ``width * ratio / (vmax - center)`` and the
    centre. Asymmetric: a window of ``ratio * width`` starting ``position`` of the way across
    the slack; an integer zero point is rounded onto the grid (scored as it will be stored).
    Pure tensor arithmetic, shared by the eager and the compiled scorers."""
    if symmetric:
        scale = width * ratio / (vmax - center)
        return scale, torch.full_like(scale, center)
    start = low + position * (1.0 - ratio) * width
    scale = ratio * width / (vmax - vmin)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = vmin - start / safe
    if int_zero:
        zero = zero.round().clamp(vmin, vmax)
    return scale, zero
