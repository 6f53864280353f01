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
    # Zero points as float32 values (integer-valued for zero_point="int"), packed at the end.
    zero_codes = torch.zeros(shapes["scale"], dtype=torch.float32, device=device)
    if matrix.numel():
        if spec.granularity == "tensor":
            # Fits work on float32 blocks: fp16 ranges overflow and bf16 scales are too coarse.
            blocks = matrix.reshape(1, -1).to(torch.float32)
            scale[:], zero = _fit_blocks(blocks, grid, fit, spec, scale_dtype, name)
            zero_codes[:] = zero
            for r0, r1 in _row_chunks(layout, device):
                packed[r0:r1] = _encode_rows(matrix[r0:r1], scale, zero_codes, layout, grid, spec)
        else:
            for r0, r1 in _row_chunks(layout, device):
                rows = matrix[r0:r1]
                blocks = rows.to(torch.float32).reshape(-1, layout.group_len)
                s, z = _fit_blocks(blocks, grid, fit, spec, scale_dtype, name)
                scale[r0:r1] = s.view(r1 - r0, layout.groups)
                zero_codes[r0:r1] = z.view(r1 - r0, layout.groups)
                packed[r0:r1] = _encode_rows(
                    rows, scale[r0:r1], zero_codes[r0:r1], layout, grid, spec
                )
    if spec.symmetric:
        zero = None
    elif spec.zero_point == "float":
        zero = zero_codes.to(scale_dtype)  # exact: the values were rounded to it in the fit
    else:
        zero = pack(zero_codes.to(torch.uint8), spec.bits)
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
    """Run the fit on float32 ``blocks [B, n]`` -> (stored scale [B], zero as stored, float32)."""
    # Fits propagate NaN/Inf of a block into its scale (their reductions do), so checking the
    # scales catches bad weights without another pass over the data.
    scale, zero = fit(blocks, grid, spec)
    if not (torch.isfinite(scale).all() and (zero is None or torch.isfinite(zero).all())):
        raise ValueError(f"{name} contains NaN or Inf; clean the weights before quantizing")
    stored = scale.to(scale_dtype)
    # Never store a scale smaller than the fit's: the block's range would no longer fit on the
    # grid and its extremes would be clipped by more than half a step. Bump those to the next
    # representable value (positive floats order like their bit patterns).
    low = stored.to(torch.float32) < scale
    if scale_dtype != torch.float32 and low.any():
        bumped = (stored.view(torch.int16) + 1).view(scale_dtype)
        stored = torch.where(low, bumped, stored)
    if not torch.isfinite(stored).all():
        raise ValueError(f"{name}: scales overflow {spec.scale_dtype}; use scale_dtype='float32'")
    # A scale that underflows to 0 in float16 would make every code meaningless.
    tiny = torch.finfo(scale_dtype).tiny
    stored = torch.where(stored > 0, stored, torch.full_like(stored, tiny))
    if zero is None:
        return stored, torch.full_like(stored, grid.center(spec.bits), dtype=torch.float32)
    if spec.zero_point == "float":
        stored_zero = zero.to(scale_dtype)
        if not torch.isfinite(stored_zero).all():
            raise ValueError(f"{name}: zero points overflow {spec.scale_dtype}")
        return stored, stored_zero.to(torch.float32)
    vmin, vmax = grid.value_range(spec.bits)
    return stored, zero.round().clamp_(vmin, vmax)


def _encode_rows(rows, scale, zero_codes, layout, grid, spec):
    """Codes for ``rows [r, cols]`` given their scales/zeros ``[r or 1, G]`` -> packed uint8."""
    r = rows.shape[0]
    inv = scale.to(torch.float32).reciprocal().unsqueeze(-1)
    zero = zero_codes.to(torch.float32).unsqueeze(-1)
    blocks = rows.reshape(r, layout.groups, layout.group_len)
    normalized = torch.addcmul(zero, blocks.to(torch.float32), inv)
    codes = grid.encode_(normalized, spec.bits).view(r, layout.cols)
    return pack(codes, spec.bits)
