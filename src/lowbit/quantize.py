"""`quantize(tensor, spec)`: fit the grid to each block, round to codes, pack."""

from __future__ import annotations

import torch

from lowbit.fit import get_fit
from lowbit.grids import get_grid
from lowbit.packing import pack
from lowbit.rotation import pack_signs, random_signs, rotate
from lowbit.spec import QuantSpec
from lowbit.tensor import FLOAT_DTYPES, BlockLayout, QuantizedTensor

# Rows are processed in chunks of about this many weights, so the float32 working copy stays
# bounded (a 128k x 8k embedding would otherwise need a 4 GB temporary).
CHUNK_ELEMENTS = 1 << 20


def quantize(tensor: torch.Tensor, spec: QuantSpec, *, name: str = "tensor") -> QuantizedTensor:
    """Quantize a floating-point tensor.

    Args:
        tensor: fp32, fp16 or bf16, any shape (viewed as ``[shape[0], rest]``), any strides.
        spec: what to do (`QuantSpec`).
        name: how errors refer to the tensor (``quantize_model`` passes the layer name).

    Returns:
        A `QuantizedTensor` whose ``dequantize()`` has ``tensor``'s shape and dtype.

    Raises:
        TypeError: ``tensor`` is not a floating-point tensor of a supported dtype, or ``spec``
            is not a `QuantSpec`.
        ValueError: NaN/Inf in ``tensor``, bits out of the grid's range, a group size that does
            not divide the row, or scales that overflow ``spec.scale_dtype``.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES.values():
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")
    # Quantized values carry no gradient: never keep the caller's autograd graph alive.
    tensor = tensor.detach()
    grid = get_grid(spec.grid)
    try:
        grid.check_spec(spec)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    fit = get_fit(spec.fit)
    try:
        layout = BlockLayout.of(tensor.shape, spec)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    scale_dtype = FLOAT_DTYPES[spec.scale_dtype]
    matrix = tensor.reshape(layout.rows, layout.cols)
    signs = None
    if spec.rotation and matrix.numel():
        signs = random_signs(layout.cols, spec.rotation_seed).to(matrix.device)
        matrix = rotate(matrix.to(torch.float32), signs)
    device = tensor.device
    shapes = layout.expected_shapes(spec)
    packed = torch.zeros(shapes["packed"], dtype=torch.uint8, device=device)
    scale = torch.ones(shapes["scale"], dtype=scale_dtype, device=device)
    # Zero points in code units (what encoding uses) and as they will be stored.
    zero_codes = torch.zeros(shapes["scale"], dtype=torch.float32, device=device)
    zero_stored = torch.zeros(shapes["scale"], dtype=torch.float32, device=device)
    if matrix.numel():
        if spec.granularity == "tensor":
            # Fits work on float32 blocks: fp16 ranges overflow and bf16 scales are too coarse.
            blocks = matrix.reshape(1, -1).to(torch.float32)
            scale[:], zero, kept = _fit_blocks(blocks, grid, fit, spec, scale_dtype, name)
            zero_codes[:] = zero
            if kept is not None:
                zero_stored[:] = kept
            for r0, r1 in _row_chunks(layout, device):
                packed[r0:r1] = _encode_rows(matrix[r0:r1], scale, zero_codes, layout, grid, spec)
        else:
            for r0, r1 in _row_chunks(layout, device):
                rows = matrix[r0:r1]
                blocks = rows.to(torch.float32).reshape(-1, layout.group_len)
                s, z, kept = _fit_blocks(blocks, grid, fit, spec, scale_dtype, name)
                scale[r0:r1] = s.view(r1 - r0, layout.groups)
                zero_codes[r0:r1] = z.view(r1 - r0, layout.groups)
                if kept is not None:
                    zero_stored[r0:r1] = kept.view(r1 - r0, layout.groups)
                packed[r0:r1] = _encode_rows(
                    rows, scale[r0:r1], zero_codes[r0:r1], layout, grid, spec
                )
    if spec.symmetric:
        zero = None
    elif spec.zero_point == "float":
        zero = zero_stored.to(scale_dtype)  # exact: the offsets were rounded to it in the fit
    else:
        zero = pack(zero_stored.to(torch.uint8), spec.bits)
    if spec.rotation:
        signs = torch.ones(layout.cols, device=device) if signs is None else signs
        signs = pack_signs(signs)
    return QuantizedTensor(packed, scale, zero, spec, tensor.shape, tensor.dtype, signs)


def _row_chunks(layout: BlockLayout, device: torch.device):
    """(start, stop) row ranges of about CHUNK_ELEMENTS weights each (at least one row).

    On accelerators the chunks are 64x larger: there the cost is per kernel launch, not cache.
    """
    budget = CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS * 64
    step = max(1, budget // max(1, layout.cols))
    for r0 in range(0, layout.rows, step):
        yield r0, min(layout.rows, r0 + step)


def _fit_blocks(blocks, grid, fit, spec, scale_dtype, name):
    """Run the fit on float32 ``blocks [B, n]``.

    Returns (stored scale [B] in ``scale_dtype``, zero [B] float32 in code units as dequantization
    will see it, stored zero [B] or None): the stored zero is the integer code (``"int"``) or,
    for ``zero_point="float"``, the block's lowest representable value ``m`` in ``scale_dtype``
    (a value offset stays well conditioned where a zero in code units would not).
    """
    # Fits propagate NaN/Inf of a block into its scale (their reductions do), so checking the
    # scales catches bad weights without another pass over the data.
    scale, zero = fit(blocks, grid, spec)
    if not (torch.isfinite(scale).all() and (zero is None or torch.isfinite(zero).all())):
        raise ValueError(f"{name} contains NaN or Inf; clean the weights before quantizing")
    vmin, vmax = grid.value_range(spec.bits)
    offset = None
    if zero is not None and spec.zero_point == "float":
        # Store the range's low end rounded *down*, then widen the scale to still reach the
        # high end: every weight stays within half a step after both roundings.
        low_end = (vmin - zero) * scale
        high_end = (vmax - zero) * scale
        offset = _round_down(low_end, scale_dtype)
        if not torch.isfinite(offset).all():
            raise ValueError(
                f"{name}: offsets overflow {spec.scale_dtype}; use scale_dtype='float32'"
            )
        scale = torch.where(scale > 0, (high_end - offset.float()) / (vmax - vmin), scale)
    stored = _round_up(scale, scale_dtype)
    if not torch.isfinite(stored).all():
        raise ValueError(f"{name}: scales overflow {spec.scale_dtype}; use scale_dtype='float32'")
    # A scale that underflows to 0 would make the block's codes meaningless; a fitted 0 (an
    # all-zero block) stays 0 and restores exact zeros whatever the grid's levels.
    tiny = torch.finfo(scale_dtype).tiny
    stored = torch.where((stored == 0) & (scale > 0), torch.full_like(stored, tiny), stored)
    if zero is None:
        return stored, torch.full_like(stored, grid.center(spec.bits), dtype=torch.float32), None
    if offset is not None:
        return stored, float_zero(offset, stored, vmin), offset
    zero = zero.round().clamp_(vmin, vmax)
    return stored, zero, zero


def float_zero(offset: torch.Tensor, scale: torch.Tensor, vmin: float) -> torch.Tensor:
    """Zero point in code units, float32, from a value offset ``m`` (the block's value at the
    lowest code): ``vmin - m / scale``, and ``vmin`` where the scale is 0."""
    scale = scale.to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(
        scale > 0, vmin - offset.to(torch.float32) / safe, torch.full_like(scale, vmin)
    )


def _round_up(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (>= 0) in ``dtype``, never below the float32 value."""
    stored = values.to(dtype)
    if dtype != torch.float32:
        low = stored.to(torch.float32) < values
        if low.any():  # positive floats order like their bit patterns: one ulp up
            stored = torch.where(low, (stored.view(torch.int16) + 1).view(dtype), stored)
    return stored


def _round_down(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype``, never above the float32 value."""
    stored = values.to(dtype)
    high = stored.to(torch.float32) > values
    if high.any():
        stored = torch.where(
            high, torch.nextafter(stored, torch.full_like(stored, -torch.inf)), stored
        )
    return stored


def _encode_rows(rows, scale, zero_codes, layout, grid, spec):
    """Codes for ``rows [r, cols]`` given their scales/zeros ``[r or 1, G]`` -> packed uint8."""
    r = rows.shape[0]
    scale32 = scale.to(torch.float32)
    # An all-zero block has scale 0: every weight maps to the zero point, restored as 0.
    inv = torch.where(scale32 > 0, scale32.reciprocal(), torch.zeros_like(scale32)).unsqueeze(-1)
    zero = zero_codes.to(torch.float32).unsqueeze(-1)
    blocks = rows.reshape(r, layout.groups, layout.group_len)
    normalized = torch.addcmul(zero, blocks.to(torch.float32), inv)
    codes = grid.encode_(normalized, spec.bits).view(r, layout.cols)
    return pack(codes, spec.bits)
