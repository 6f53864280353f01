"""`quantize(tensor, spec)`: fit the grid to each block, round to codes, pack."""

from __future__ import annotations

import torch

from lowbit.dtypes import FLOAT_DTYPES
from lowbit.fit import fit_options, get_fit
from lowbit.grids import get_grid
from lowbit.packing import pack
from lowbit.rotation import pack_signs, random_signs, rotate
from lowbit.spec import QuantSpec
from lowbit.storage import stored_params
from lowbit.tensor import BlockLayout, QuantizedTensor

# Rows are processed in chunks of about this many weights, so the float32 working copy stays
# bounded (a 128k x 8k embedding would otherwise need a 4 GB temporary).
CHUNK_ELEMENTS = 1 << 20


def quantize(
    tensor: torch.Tensor,
    spec: QuantSpec,
    *,
    name: str = "tensor",
    importance: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize a floating-point tensor.

    Args:
        tensor: fp32, fp16 or bf16, any shape (viewed as ``[shape[0], rest]``), any strides.
        spec: what to do (`QuantSpec`).
        name: how errors refer to the tensor (``quantize_model`` passes the layer name).
        importance: optional non-negative weights of the squared error that searching fits
            (``mse``, ``hqq``, ``entropy``) minimise: ``tensor``'s shape (one per weight) or
            ``[shape[1]]`` for a 2-D tensor (one per input feature, e.g. the mean squared
            activation from `lowbit.calibrate`). Not combinable with rotation (the rotated
            weights mix the features).

    Returns:
        A `QuantizedTensor` whose ``dequantize()`` has ``tensor``'s shape and dtype.

    Raises:
        TypeError: ``tensor`` is not a floating-point tensor of a supported dtype, or ``spec``
            is not a `QuantSpec`.
        ValueError: NaN/Inf in ``tensor``, a meta tensor, bits out of the grid's range, a range
            that overflows float32, or scales that overflow or underflow ``spec.scale_dtype``
            (blocks whose scale underflows are stored as exact zeros when they hold no more than
            ``UNDERFLOW_TOLERANCE`` of the tensor's energy). A group size that does not divide
            the row is fine: the last group of each row is partial.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES.values():
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")
    if tensor.is_meta:
        raise ValueError(
            f"{name} is on the meta device (it has a shape but no values): load the weights "
            "before quantizing"
        )
    # Quantized values carry no gradient: never keep the caller's autograd graph alive.
    tensor = tensor.detach()
    grid = get_grid(spec.grid)
    try:
        grid.check_spec(spec)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    fit = get_fit(spec.fit)
    fit_options(spec)  # unknown options are an error even for fits that take none
    try:
        layout = BlockLayout.of(tensor.shape, spec)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    scale_dtype = FLOAT_DTYPES[spec.scale_dtype]
    matrix = tensor.reshape(layout.rows, layout.cols)
    weights = _importance_matrix(importance, tensor, layout, spec, name)
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
    lost = []  # energy (float64) of blocks whose scale underflowed, see _fit_blocks
    if matrix.numel():
        if spec.granularity == "tensor":
            # Fits work on float32 blocks: fp16 ranges overflow and bf16 scales are too coarse.
            blocks = matrix.reshape(1, -1).to(torch.float32)
            w = None if weights is None else weights.reshape(1, -1)
            scale[:], zero, kept = _fit_blocks(blocks, grid, fit, spec, scale_dtype, name, w, lost)
            zero_codes[:] = zero
            if kept is not None:
                zero_stored[:] = kept
            for r0, r1 in _row_chunks(layout, device):
                packed[r0:r1] = _encode_rows(matrix[r0:r1], scale, zero_codes, layout, grid, spec)
        else:
            for r0, r1 in _row_chunks(layout, device):
                rows = _complete_groups(matrix[r0:r1], layout)
                blocks = rows.to(torch.float32).reshape(-1, layout.group_len)
                w = _group_weights(weights, r0, r1, layout, device)
                s, z, kept = _fit_blocks(blocks, grid, fit, spec, scale_dtype, name, w, lost)
                scale[r0:r1] = s.view(r1 - r0, layout.groups)
                zero_codes[r0:r1] = z.view(r1 - r0, layout.groups)
                if kept is not None:
                    zero_stored[r0:r1] = kept.view(r1 - r0, layout.groups)
                packed[r0:r1] = _encode_rows(
                    rows, scale[r0:r1], zero_codes[r0:r1], layout, grid, spec
                )
    if lost:
        _check_underflow(sum(lost), tensor, spec, name)
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


def _complete_groups(rows: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``rows [r, cols]`` -> ``[r, padded_cols]``: a partial last group is completed with its
    own values repeated, which keeps its range (and roughly its distribution) for the fits."""
    if not layout.ragged:
        return rows
    tail = rows[:, (layout.groups - 1) * layout.group_len :]
    repeat = torch.arange(layout.padded_cols - layout.cols, device=rows.device) % tail.shape[1]
    return torch.cat([rows, tail[:, repeat]], dim=1)


def _group_weights(weights, r0: int, r1: int, layout: BlockLayout, device):
    """Importance of rows ``r0:r1`` as float32 ``[blocks, group_len]``, or ``None``. With a
    partial last group the completing copies weigh 0, so the weighted fits see only the real
    values (the unweighted ones see the repeated values, whose range is the real one)."""
    if not layout.ragged:
        return None if weights is None else weights[r0:r1].reshape(-1, layout.group_len)
    real = torch.ones(r1 - r0, layout.cols, device=device) if weights is None else weights[r0:r1]
    real = real.to(torch.float32)
    padded = torch.nn.functional.pad(real, (0, layout.padded_cols - layout.cols))
    return padded.reshape(-1, layout.group_len)


def _importance_matrix(importance, tensor, layout, spec, name):
    """``importance`` checked and viewed as float32 ``[rows, cols]`` (expanded, not copied)."""
    if importance is None:
        return None
    if not isinstance(importance, torch.Tensor) or not importance.is_floating_point():
        raise TypeError(f"{name}: importance must be a floating-point tensor")
    if spec.rotation:
        raise ValueError(
            f"{name}: importance weights cannot be combined with rotation (the rotated weights "
            f"mix input features); drop one of the two"
        )
    importance = importance.detach()  # weights of a search, never part of a graph
    if tuple(importance.shape) == tuple(tensor.shape):
        matrix = importance.reshape(layout.rows, layout.cols)
    elif importance.dim() == 1 and tensor.dim() == 2 and importance.shape[0] == layout.cols:
        matrix = importance.unsqueeze(0).expand(layout.rows, layout.cols)
    else:
        raise ValueError(
            f"{name}: importance has shape {tuple(importance.shape)}; expected "
            f"{tuple(tensor.shape)} or [{layout.cols}]"
        )
    if not torch.isfinite(importance).all() or (importance < 0).any():
        raise ValueError(f"{name}: importance must be finite and >= 0")
    return matrix.to(device=tensor.device, dtype=torch.float32)


def _row_chunks(layout: BlockLayout, device: torch.device):
    """(start, stop) row ranges of about CHUNK_ELEMENTS weights each (at least one row).

    On accelerators the chunks are 64x larger: there the cost is per kernel launch, not cache.
    """
    budget = CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS * 64
    step = max(1, budget // max(1, layout.padded_cols))
    for r0 in range(0, layout.rows, step):
        yield r0, min(layout.rows, r0 + step)


# A tensor may lose at most this fraction of its energy (sum of squares) to blocks stored as
# zeros because their scale underflowed: a dead row of 1e-12 in a real layer is fine, a whole
# tensor of 1e-10 weights in float16 scales is not.
UNDERFLOW_TOLERANCE = 1e-6


def _fit_blocks(blocks, grid, fit, spec, scale_dtype, name, weights=None, lost=None):
    """Run the fit on float32 ``blocks [B, n]`` and round its result for storage.

    Returns (stored scale [B] in ``scale_dtype``, zero [B] float32 in code units as dequantization
    will see it, stored zero [B] or None); see `lowbit.storage.stored_params`. The energy of
    blocks stored as zeros because their scale underflowed is appended to ``lost``.
    """
    # Fits propagate NaN/Inf of a block into its scale (their reductions do), so checking the
    # scales catches bad weights without another pass over the data.
    scale, zero = fit(blocks, grid, spec, weights=weights)
    if not (torch.isfinite(scale).all() and (zero is None or torch.isfinite(zero).all())):
        if not torch.isfinite(blocks).all():
            raise ValueError(f"{name} contains NaN or Inf; clean the weights before quantizing")
        low, high = blocks.min().item(), blocks.max().item()
        raise ValueError(
            f"{name}: its values span {low:.4g} to {high:.4g}, a range that overflows float32 "
            "in the scale fit (no scale dtype can store it); rescale the weights"
        )
    vmin, vmax = grid.value_range(spec.bits)
    stored, zero_codes, kept = stored_params(
        scale, zero, vmin, vmax, grid.center(spec.bits), spec, scale_dtype
    )
    if kept is not None and not torch.isfinite(kept).all():
        raise ValueError(f"{name}: offsets overflow {spec.scale_dtype}; use scale_dtype='float32'")
    if not torch.isfinite(stored).all():
        raise ValueError(f"{name}: scales overflow {spec.scale_dtype}; use scale_dtype='float32'")
    if lost is not None:
        zeroed = (stored == 0) & (scale > 0)
        if zeroed.any():
            lost.append(blocks[zeroed].to(torch.float64).square().sum().item())
    return stored, zero_codes, kept


def _check_underflow(lost: float, tensor: torch.Tensor, spec: QuantSpec, name: str) -> None:
    """Refuse a tensor whose blocks stored as zeros (scale underflow) held more than
    ``UNDERFLOW_TOLERANCE`` of its energy."""
    total = tensor.to(torch.float64).square().sum().item()
    if lost > UNDERFLOW_TOLERANCE * total:
        largest = tensor.abs().max().item()
        raise ValueError(
            f"{name}: weights this small (largest |w| {largest:.3g}) need scales below what "
            f"{spec.scale_dtype} can store; they would be restored as zeros "
            f"({lost / total:.1%} of the tensor's energy); use scale_dtype='float32'"
        )


def _encode_rows(rows, scale, zero_codes, layout, grid, spec):
    """Codes for ``rows [r, cols]`` given their scales/zeros ``[r or 1, G]`` -> packed uint8."""
    r = rows.shape[0]
    scale32 = scale.to(torch.float32)
    # An all-zero block has scale 0: every weight maps to the zero point, restored as 0.
    inv = torch.where(scale32 > 0, scale32.reciprocal(), torch.zeros_like(scale32)).unsqueeze(-1)
    zero = zero_codes.to(torch.float32).unsqueeze(-1)
    blocks = rows.reshape(r, layout.groups, layout.group_len).to(torch.float32)
    if getattr(grid, "codes_are_values", False) and (spec.symmetric or spec.zero_point == "int"):
        # An integer zero is added after rounding: adding it first (128 at 8 bits) costs the
        # quotient low bits, and dividing (not multiplying by 1/s) rounds exactly as
        # round(w / s), the formula of DARE and SmolQuant, at every tie and near-tie.
        scale3 = scale32.unsqueeze(-1)
        safe = torch.where(scale3 > 0, scale3, torch.ones_like(scale3))
        normalized = torch.where(scale3 > 0, blocks / safe, 0.0).round_().add_(zero)
    else:
        normalized = torch.addcmul(zero, blocks, inv)
    codes = grid.encode_(normalized, spec.bits).view(r, layout.padded_cols)
    return pack(codes[:, : layout.cols], spec.bits)
