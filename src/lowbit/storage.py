"""How fitted scales and zero points become stored ones (rounded to ``spec.scale_dtype``).

Shared by `lowbit.quantize` (which stores them) and the searching fits (which score candidates
as they will be stored, so that the rounding cannot undo the choice).
"""

from __future__ import annotations

import torch

from lowbit.spec import QuantSpec


def stored_params(
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    vmin: float,
    vmax: float,
    center: float,
    spec: QuantSpec | str,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round fitted ``scale``/``zero`` (float32, any shape) to what will be stored.

    ``spec`` is the spec or just its ``zero_point`` (``"int"``/``"float"``). Branch-free
    pointwise arithmetic, so the compiled scorers (`lowbit.fit.fused`) apply the same rounding.

    Returns (stored scale in ``scale_dtype``, zero in code units float32 as dequantization will
    see it, stored zero or None): the stored zero is the integer code (``zero_point="int"``) or,
    for ``"float"``, the block's lowest representable value ``m`` in ``scale_dtype`` (a value
    offset stays well conditioned where a zero in code units would not). Non-finite inputs
    stay non-finite; callers check.
    """
    zero_point = spec if isinstance(spec, str) else spec.zero_point
    fitted = scale
    reach = None
    offset = None
    if zero is not None and zero_point == "float":
        # Store the range's low end rounded *down*, then widen the scale to still reach the
        # high end: every weight stays within half a step after both roundings.
        low_end = (vmin - zero) * scale
        high_end = (vmax - zero) * scale
        reach = torch.maximum(low_end.abs(), high_end.abs())
        offset = round_down(low_end, scale_dtype)
        scale = torch.where(scale > 0, (high_end - offset.float()) / (vmax - vmin), scale)
    stored = round_up(scale, scale_dtype)
    # Below the format's subnormals a scale rounds up to many times itself, and a grid without
    # a zero level would restore such a block amplified (1e-10 weights as 1e-8). Those blocks
    # are stored with scale 0, which restores exact zeros on every grid, like an all-zero block
    # (a fitted 0): an error of at most the block's norm. `lowbit.quantize` refuses a tensor
    # that would lose more than a trace of its energy this way (see `underflowed`).
    # (Judged against the fitted scale: a float zero's offset rounded away from a tiny range
    # widens the scale to match, which must not hide the underflow.)
    lost = underflowed(fitted, stored)
    if reach is not None:
        # A block far from 0 next to its spread legitimately widens its scale past twice the
        # fitted one (its offset's rounding step): it underflows only if the widened steps
        # are coarser than the block's own values.
        lost = lost & (stored.to(torch.float32) * (vmax - vmin) > reach)
    stored = torch.where(lost, torch.zeros_like(stored), stored)
    if offset is not None:
        offset = torch.where(stored == 0, torch.zeros_like(offset), offset)
    if zero is None:
        return stored, torch.full_like(stored, center, dtype=torch.float32), None
    if offset is not None:
        return stored, float_zero(offset, stored, vmin), offset
    zero = zero.round().clamp_(vmin, vmax)
    return stored, zero, zero


def underflowed(scale: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Bool mask of blocks whose fitted ``scale`` (float32) the storage dtype cannot hold:
    ``stored`` (rounded up) is more than twice it, which happens only below the normal range
    (in float16 below about 3e-8)."""
    # Only below the normal range: elsewhere the rounding is relative (and an overflow to inf
    # is reported as such by the caller).
    return (scale < torch.finfo(stored.dtype).tiny) & (stored.to(torch.float32) > 2 * scale)


def float_zero(offset: torch.Tensor, scale: torch.Tensor, vmin: float) -> torch.Tensor:
    """Zero point in code units, float32, from a value offset ``m`` (the block's value at the
    lowest code): ``vmin - m / scale``, and ``vmin`` where the scale is 0."""
    scale = scale.to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(
        scale > 0, vmin - offset.to(torch.float32) / safe, torch.full_like(scale, vmin)
    )


def round_up(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (float32) in ``dtype`` (float32/float16/bfloat16), never below them."""
    stored = values.to(dtype)
    if dtype == torch.float32:
        return stored
    return torch.where(stored.to(torch.float32) < values, _neighbour(stored, 1.0), stored)


def round_down(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (float32) in ``dtype`` (float32/float16/bfloat16), never above them."""
    stored = values.to(dtype)
    if dtype == torch.float32:
        return stored
    return torch.where(stored.to(torch.float32) > values, _neighbour(stored, -1.0), stored)


def _neighbour(stored: torch.Tensor, direction: float) -> torch.Tensor:
    """The next representable value of ``stored``'s half-precision dtype above (``direction``
    1) or below (-1) it.

    Float arithmetic, not bit tricks, so that compiled kernels vectorise it: the spacing of the
    format around ``t`` is between ``eps * |t| / 2`` and ``eps * |t|`` (``eps * tiny`` among
    subnormals), so ``t +- 0.6 * eps * max(|t|, tiny)`` lies strictly between half a spacing
    and one and a half, and rounds to the neighbour (checked exhaustively in the tests).
    """
    info = torch.finfo(stored.dtype)
    t = stored.to(torch.float32)
    step = (0.6 * info.eps) * torch.clamp(t.abs(), min=info.tiny)
    # A value beyond the format's range was stored as +-inf: its neighbour towards 0 is +-max.
    largest = torch.where(t > 0, info.max, -info.max)
    return torch.where(t.isinf(), largest, t + direction * step).to(stored.dtype)
