"""SmolQuant's API (W8A16: int8 per-channel weights, 16-bit activations) over lowbit's core.

Same names, signatures and defaults as SmolQuant; the arithmetic is lowbit's int8 asymmetric
grid with float32 scales: ``scale = (max - min) / 255``, ``zero_point = round(-128 - min / scale)``,
``q = clamp(round(w / scale + zero_point), -128, 127)``, ``w ~ scale * (q - zero_point)``.

Fixed faults of the seed (the API is unchanged):

* its zero point was cast to int8 before clamping, so rows that are all positive or all
  negative wrapped around. Here the range always includes 0, so the zero point always lies in
  ``[-128, 127]``; rows with both signs get exactly the seed's scale and zero point;
* constant (and all-zero) rows divided by zero; here they are restored exactly or within half
  a step;
* its layer returned bfloat16 even in a float32 model; here the output has the input's dtype;
* zero points are returned as int32 (values in ``[-128, 127]``) so that ``q - zero_point`` cannot
  overflow int8 arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.model import set_submodule
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
        ``(scale, zero_point, quantized)``: float32 0-d tensor, int32 0-d tensor, and int8 codes
        of ``tensor``'s shape; ``scale * (quantized - zero_point)`` restores the tensor.
    """
    _check_dtype(dtype)
    qt = quantize(tensor, _TENSOR, name="tensor")
    scale, zero, codes = _signed(qt)
    return scale.reshape(()), zero.reshape(()), codes.reshape(tensor.shape)


def channel_linear_quantize(tensor: torch.Tensor, dim: int = 0, dtype=torch.int8):
    """Per-channel asymmetric int8 quantization along ``dim`` (one scale per index of ``dim``).

    Returns:
        ``(scales, zero_points, quantized)``: float32 ``[tensor.shape[dim]]``, int32
        ``[tensor.shape[dim]]`` and int8 codes of ``tensor``'s shape.
    """
    _check_dtype(dtype)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"dim={dim!r} is out of range for a tensor with {tensor.dim()} dims")
    moved = tensor.movedim(dim, 0)
    qt = quantize(moved, _CHANNEL, name="tensor")
    scale, zero, codes = _signed(qt)
    return scale, zero, codes.reshape(moved.shape).movedim(0, dim)


class W8A16LinearLayer(QuantLinear):
    """SmolQuant's int8 weight-only linear layer: a `QuantLinear` with an int8 per-channel spec.

    Args:
        in_features, out_features: as `nn.Linear`.
        dtype: the model's dtype (of the bias and of what dequantization returns).
        bias: a bias tensor ``[out_features]``, ``None``/``False`` for none, ``True`` for zeros.

    ``int8_weights`` (int8 ``[out, in]``), ``scales`` (float32 ``[out]``) and ``zero_point``
    (int32 ``[out]``) are read-only properties computed from what the layer stores (lowbit's
    ``packed``/``scale``/``zero`` buffers, which ``state_dict`` saves); writing into them does
    not change the layer. A state dict saved by SmolQuant (with its buffer names) loads as is.
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
        """float32 per-row scales ``[out]`` (read-only)."""
        return self.scale.reshape(-1)

    @property
    def zero_point(self) -> torch.Tensor:
        """int32 per-row zero points ``[out]``, in ``[-128, 127]`` (read-only)."""
        return unpack(self.zero, 8, 1).reshape(-1).to(torch.int32) - 128

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
        """Quantize ``weight [out_features, in_features]`` into this layer.

        Returns:
            ``(scales, zero_point, int8_weights)`` as stored.
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
        """``scales * (quant - zero_pts)`` per output row, in the layer's dtype."""
        values = quant.to(torch.float32) - zero_pts.to(torch.float32).reshape(-1, 1)
        return (values * scales.to(torch.float32).reshape(-1, 1)).to(self.weight_dtype)


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
    # A child registered under several names is replaced under all of them (it stays shared).
    paths: dict[int, list[str]] = {}
    for path, child in module.named_modules(remove_duplicate=False):
        paths.setdefault(id(child), []).append(path)
    originals = dict(module.named_modules())
    for name, layer in replacements:
        for path in paths[id(originals[name])]:
            if path.rpartition(".")[2] not in excluded:
                set_submodule(module, path, layer)
    return module
