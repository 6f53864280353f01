"""SmolQuant's API (W8A16: int8 per-channel weights, 16-bit activations) over lowbit's core.

Same names, signatures, defaults and shapes as SmolQuant; the arithmetic is lowbit's int8
asymmetric grid with float32 scales: ``scale = (max - min) / 255``,
``zero_point = round(-128 - min / scale)``, ``q = clamp(round(w / scale + zero_point), -128, 127)``,
``w ~ scale * (q - zero_point)``.

Shapes, as SmolQuant's: per-channel scales and zero points keep the reduced dims with size 1
(``[C, 1]`` for ``dim=0``, ``[1, C]`` for ``dim=1``; the layer's ``scales`` / ``zero_point`` are
``[out_features, 1]``), so ``scale * (q - zero_point)`` broadcasts along the right axis; flat
``[C]`` vectors would broadcast along the last axis, which on a square matrix gives wrong values
without an error.

Fixed faults of the seed (the API is unchanged):

* its zero point was cast to int8 before clamping, so rows that are all positive or all
  negative wrapped around. Here the range always includes 0, so the zero point always lies in
  ``[-128, 127]``; rows with both signs get exactly the seed's scale and zero point;
* constant (and all-zero) rows divided by zero; here they are restored exactly or within half
  a step;
* its layer computed in bfloat16 (``forward``'s default ``dtype``) even in a float32 model; here
  it computes in the input's dtype: float32 and float16 as ``F.linear(x, dequantized) + bias``
  in that dtype, bfloat16 through PyTorch's packed int8 kernel where one applies (same bf16
  rounding as the seed's formula);
* its layer stored the scales in the model's dtype (bfloat16 scales are off by up to 0.4%, on
  every weight); here they are float32 in every model;
* zero points are int32 (values in ``[-128, 127]``; the seed's were int8, or a Python int for
  `linear_quantize`) so that ``q - zero_point`` computes in int32: with int8 (or a scalar) zero
  point PyTorch computes int8 codes minus it in int8, which wraps. For the same reason
  `linear_quantize` returns ``[1, ..., 1]`` tensors rather than Python numbers (they convert
  with ``float()`` / ``int()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.modules import replace_modules
from lowbit.nn import QuantLinear
from lowbit.packing import unpack
from lowbit.quantize import quantize
from lowbit.spec import QuantSpec

_CHANNEL = QuantSpec(bits=8, granularity="channel", scale_dtype="float32")
_TENSOR = QuantSpec(bits=8, granularity="tensor", scale_dtype="float32")


def _check_dtype(dtype) -> None:
    if dtype != torch.int8:
        raise TypeError(f"dtype must be torch.int8 (W8A16 stores int8 codes), got {dtype}")


def _signed(qt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scales float32, zero points int32, int8 codes) from an 8-bit asymmetric QuantizedTensor."""
    codes = (qt.codes().to(torch.int16) - 128).to(torch.int8)
    zero = unpack(qt.zero, 8, qt.layout.groups).to(torch.int32) - 128
    return qt.scale.reshape(-1), zero.reshape(-1), codes


def linear_quantize(tensor: torch.Tensor, dtype=torch.int8):
    """Per-tensor asymmetric int8 quantization.

    Args:
        tensor: float tensor of any shape (fp32, fp16 or bf16).
        dtype: must be ``torch.int8``.

    Returns:
        ``(scale, zero_point, quantized)``: float32 and int32 tensors of shape
        ``[1] * tensor.dim()`` (the seed returned a Python float and int: these broadcast the
        same way, and make ``quantized - zero_point`` compute in int32 instead of wrapping in
        int8), and int8 codes of ``tensor``'s shape; ``scale * (quantized - zero_point)``
        restores the tensor within half a step.
    """
    _check_dtype(dtype)
    qt = quantize(tensor, _TENSOR, name="tensor")
    scale, zero, codes = _signed(qt)
    ones = (1,) * tensor.dim()
    return scale.reshape(ones), zero.reshape(ones), codes.reshape(tensor.shape)


def linear_dequantize(scale, zero_point, quantized_tensor) -> torch.Tensor:
    """SmolQuant's ``scale * (quantized_tensor.float() - zero_point)``, broadcasting as given.

    Args:
        scale: float tensor broadcastable against ``quantized_tensor`` (as `linear_quantize`
            and `channel_linear_quantize` return it), or a Python float.
        zero_point: integer tensor of the same kind, or a Python int.
        quantized_tensor: integer codes of any shape.

    Returns:
        float32 tensor of the broadcast shape (``quantized_tensor``'s for the shapes above);
        float64 if ``scale`` is float64, as in the seed.
    """
    values = quantized_tensor.float() - torch.as_tensor(zero_point).float()
    return torch.as_tensor(scale) * values


def channel_linear_quantize(tensor: torch.Tensor, dim: int = 0, dtype=torch.int8):
    """Per-channel asymmetric int8 quantization along ``dim`` (one scale per index of ``dim``).

    Args:
        tensor: float tensor of at least one dimension (fp32, fp16 or bf16).
        dim: the channel dimension (negative counts from the end).
        dtype: must be ``torch.int8``.

    Returns:
        ``(scales, zero_points, quantized)``: float32 and int32 tensors of ``tensor``'s shape
        with every dim but ``dim`` reduced to 1 (``[C, 1]`` for ``dim=0`` and ``[1, C]`` for
        ``dim=1`` of a matrix, as SmolQuant returns them), and int8 codes of ``tensor``'s
        shape; ``scales * (quantized - zero_points)`` restores the tensor.
    """
    _check_dtype(dtype)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"dim={dim!r} is out of range for a tensor with {tensor.dim()} dims")
    dim %= tensor.dim()
    moved = tensor.movedim(dim, 0)
    # lowbit's channel spec has one scale per row of [shape[0], rest]; a 1-D tensor is one row.
    qt = quantize(moved.reshape(moved.shape[0], -1), _CHANNEL, name="tensor")
    scale, zero, codes = _signed(qt)
    kept = [1] * tensor.dim()
    kept[dim] = tensor.shape[dim]
    return scale.reshape(kept), zero.reshape(kept), codes.reshape(moved.shape).movedim(0, dim)


class W8A16LinearLayer(QuantLinear):
    """SmolQuant's int8 weight-only linear layer: a `QuantLinear` with an int8 per-channel spec.

    Args:
        in_features, out_features: as `nn.Linear`.
        dtype: the model's dtype (of the bias and of ``dequantize_weight``).
        bias: a bias tensor ``[out_features]``, ``None``/``False`` for none, ``True`` for zeros.

    ``int8_weights`` (int8 ``[out, in]``), ``scales`` (float32 ``[out, 1]``) and ``zero_point``
    (int32 ``[out, 1]``), SmolQuant's buffer names and shapes, are read-only properties computed
    from what the layer stores (lowbit's ``packed``/``scale``/``zero`` buffers, which
    ``state_dict`` saves); writing into them does not change the layer. A state dict saved by
    SmolQuant (``int8_weights``, ``scales`` and ``zero_point``, ``[out, 1]`` or flat) loads as is.
    """

    def __init__(self, in_features, out_features, dtype=torch.float32, bias=None):
        if not (bias is None or isinstance(bias, (bool, torch.Tensor))):
            raise TypeError(f"bias must be a tensor, a bool or None, got {type(bias).__name__}")
        has_bias = bias is not None and bias is not False
        super().__init__(in_features, out_features, has_bias, _CHANNEL, dtype=dtype)
        if isinstance(bias, torch.Tensor):
            if tuple(bias.shape) != (out_features,):
                raise ValueError(f"bias has shape {list(bias.shape)}, expected [{out_features}]")
            with torch.no_grad():
                self.bias.copy_(bias.detach().to(dtype))

    @property
    def int8_weights(self) -> torch.Tensor:
        """int8 codes ``[out, in]`` (SmolQuant's buffer name; read-only)."""
        return (self.packed.to(torch.int16) - 128).to(torch.int8)

    @property
    def scales(self) -> torch.Tensor:
        """float32 per-row scales ``[out, 1]`` (read-only)."""
        return self.scale.reshape(-1, 1)

    @property
    def zero_point(self) -> torch.Tensor:
        """int32 per-row zero points ``[out, 1]``, in ``[-128, 127]`` (read-only)."""
        return unpack(self.zero, 8, 1).reshape(-1, 1).to(torch.int32) - 128

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state dict saved by SmolQuant itself (int8_weights / scales / zero_point) loads too:
        # its dequantization scales * (q - zp) equals ours with code q + 128 and zero zp + 128.
        names = [prefix + n for n in ("int8_weights", "scales", "zero_point")]
        if all(n in state_dict for n in names):
            codes, scales, zeros = (state_dict.pop(n) for n in names)
            state_dict[prefix + "packed"] = (codes.to(torch.int16) + 128).to(torch.uint8)
            state_dict[prefix + "scale"] = scales.to(torch.float32).reshape(-1, 1)
            state_dict[prefix + "zero"] = (
                (zeros.to(torch.int16) + 128).to(torch.uint8).reshape(-1, 1)
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def quantize(self, weight: torch.Tensor):
        """Quantize ``weight [out_features, in_features]`` (fp32, fp16 or bf16) into this layer.

        Returns:
            ``(scales, zero_point, int8_weights)`` as stored: float32 ``[out, 1]``, int32
            ``[out, 1]`` and int8 ``[out, in]``.
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight has shape {list(weight.shape)}, expected "
                f"[{self.out_features}, {self.in_features}]"
            )
        qt = quantize(weight.detach(), _CHANNEL, name="weight")
        with torch.no_grad():
            self.packed.copy_(qt.packed.to(self.packed.device))
            self.scale.copy_(qt.scale.to(self.scale.device))
            self.zero.copy_(qt.zero.to(self.zero.device))
        self._reset_caches()
        return self.scales, self.zero_point, self.int8_weights

    def linear_dequantize(self, scales, zero_pts, quant) -> torch.Tensor:
        """SmolQuant's ``scales * (quant.float() - zero_pts.float())`` on the layer's device.

        Args:
            scales, zero_pts: tensors broadcastable against ``quant`` (``[out, 1]`` as
                `quantize` returns them, ``[1, C]`` or ``[1, 1]`` from the module functions),
                or Python numbers. They broadcast as given, as in the seed: flat ``[out]``
                vectors would pair with the columns.
            quant: integer codes, e.g. int8 ``[out, in]``.

        Returns:
            float32 tensor of the broadcast shape, as in the seed (float64 for float64 scales;
            ``dequantize_weight()`` gives the weight in the layer's dtype).
        """
        device = self.packed.device
        values = quant.to(device).float() - torch.as_tensor(zero_pts, device=device).float()
        return torch.as_tensor(scales, device=device) * values

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x [..., in_features]`` -> ``[..., out_features]``, computed and returned in ``dtype``.

        Args:
            x: float tensor.
            dtype: the computation dtype; ``None`` (default): ``x``'s. (The seed's default was
                bfloat16 whatever the model's dtype; an explicit ``dtype`` still casts ``x``.)

        float32 and float16 compute the seed's ``F.linear(x, scales * (q - zero_point)) + bias``
        in that dtype (the bias added by ``F.linear``). bfloat16 may run PyTorch's packed int8
        kernel for small batches: it takes bf16 activations, which the other dtypes would lose
        precision to.
        """
        if dtype is not None:
            x = x.to(dtype)
        if (
            x.dtype == torch.bfloat16
            or not x.is_floating_point()
            or x.dim() == 0
            or x.shape[-1] != self.in_features
        ):
            return super().forward(x)  # packed kernel or dequantize; bad inputs raise there
        weight = self._weight_for(x.dtype, torch.is_grad_enabled() and x.requires_grad)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


def replace_linear_with_target_and_quantize(module, target_class, module_name_to_exclude):
    """Replace every `nn.Linear` below ``module`` by ``target_class`` and quantize its weight.

    A linear layer is skipped when its own local attribute name (``"lm_head"``, ``"q_proj"``),
    at any depth, is in ``module_name_to_exclude``. ``target_class`` is called as
    ``target_class(in_features, out_features, dtype=..., bias=...)`` and must have
    ``.quantize(weight)``. All layers are quantized before any is swapped, so an error (NaN in a
    weight, say) leaves ``module`` unchanged.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module_name_to_exclude, str):
        raise TypeError("module_name_to_exclude must be a list of names, not a string")
    excluded = set(module_name_to_exclude or ())
    replacements = []
    for name, child in module.named_modules():
        if not name or type(child) is not nn.Linear:
            continue
        if name.rpartition(".")[2] in excluded:
            continue
        layer = target_class(
            child.in_features,
            child.out_features,
            dtype=child.weight.dtype,
            bias=None if child.bias is None else child.bias.detach(),
        )
        try:
            layer.quantize(child.weight.detach())
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
        replacements.append((name, layer.to(child.weight.device)))
    # A child registered under several names is replaced under all of them (it stays shared),
    # except where that name is excluded.
    replace_modules(
        module, dict(replacements), skip=lambda path: path.rpartition(".")[2] in excluded
    )
    return module
