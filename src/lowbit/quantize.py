"""`quantize(tensor, spec)`: check, then fit -> round -> pack through the spec's registered
rounding step (`lowbit.rounding`) and storage layout (`lowbit.layouts`)."""

from __future__ import annotations

import torch

from lowbit.dtypes import FLOAT_DTYPES
from lowbit.fit import fit_options, get_fit
from lowbit.grids import get_grid
from lowbit.packing import pack
from lowbit.rotation import pack_signs, random_signs, rotate
from lowbit.rounding import Output, Problem, get_rounding
from lowbit.spec import QuantSpec
from lowbit.tensor import BlockLayout, QuantizedTensor


def quantize(
    tensor: torch.Tensor,
    spec: QuantSpec,
    *,
    name: str = "tensor",
    importance: torch.Tensor | None = None,
    context: object = None,
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
        context: per-layer statistics the spec's rounding step needs (``None`` for
            ``"nearest"``; see `lowbit.rounding`).

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
    rounding = get_rounding(spec.rounding)
    try:
        blocks = BlockLayout.of(tensor.shape, spec)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    scale_dtype = FLOAT_DTYPES[spec.scale_dtype]
    matrix = tensor.reshape(blocks.rows, blocks.cols)
    weights = _importance_matrix(importance, tensor, blocks, spec, name)
    signs = None
    if spec.rotation and matrix.numel():
        signs = random_signs(blocks.cols, spec.rotation_seed).to(matrix.device)
        matrix = rotate(matrix.to(torch.float32), signs)
    device = tensor.device
    problem = Problem(matrix, blocks, grid, spec, fit, weights, context, name)
    out = Output.empty(problem)
    rounding(problem, out)
    scale, zero_stored, lost = out.scale, out.zero_stored, problem.lost
    if lost:
        _check_underflow(sum(lost), tensor, spec, name)
    if spec.symmetric:
        zero = None
    elif spec.zero_point == "float":
        zero = zero_stored.to(scale_dtype)  # exact: the offsets were rounded to it in the fit
    else:
        zero = pack(zero_stored.to(torch.uint8), spec.bits)
    if spec.rotation:
        signs = torch.ones(blocks.cols, device=device) if signs is None else signs
        signs = pack_signs(signs)
    return QuantizedTensor(out.packed, scale, zero, spec, tensor.shape, tensor.dtype, signs)


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


# A tensor may lose at most this fraction of its energy (sum of squares) to blocks stored as
# zeros because their scale underflowed: a dead row of 1e-12 in a real layer is fine, a whole
# tensor of 1e-10 weights in float16 scales is not.
UNDERFLOW_TOLERANCE = 1e-6


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


