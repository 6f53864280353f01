"""`QuantLinear`: a drop-in `nn.Linear` replacement holding a `QuantizedTensor`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.dtypes import FLOAT_DTYPES
from lowbit.grids import get_grid
from lowbit.kernels import DEQUANTIZE, Kernel, get_kernel
from lowbit.kernels import registry as kernel_registry
from lowbit.kernels.dispatch import DEQUANTIZE_FP32, Plan, plan_for
from lowbit.quantize import quantize
from lowbit.rotation import rotate, unpack_signs
from lowbit.spec import QuantSpec
from lowbit.tensor import BlockLayout, QuantizedTensor
from lowbit.workspace import release_workspaces as release_workspaces
from lowbit.workspace import scratch


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored quantized (weight-only quantization).

    Buffers ``packed``, ``scale`` and (asymmetric specs) ``zero`` are the `QuantizedTensor`'s
    tensors; they are what ``state_dict`` saves. Each forward takes the path its `plan` gives for
    the batch's size, input dtype and device (`lowbit.kernels.dispatch`: measured crossovers): a
    kernel, or dequantize (into a scratch buffer shared by all layers, see `release_workspaces`)
    then ``F.linear``. A float32 input gets float32-accurate output (within float32 rounding of
    ``F.linear`` with the dequantized weight) unless ``allow_bf16`` lets bfloat16 kernels serve
    it. When ``x`` needs a gradient the kernel path still runs; its backward uses the dequantized
    weight.

    Args:
        in_features, out_features, bias: as `nn.Linear`.
        spec: the weight's `QuantSpec`.
        dtype: dtype of the original weight (what ``dequantize_weight`` returns) and of the bias.
        device: where the (empty) buffers are created; ``"meta"`` gives a skeleton to load a
            state dict into with ``assign=True`` (what `lowbit.io` does).
        kernel: ``"auto"`` (registry's choice), ``"dequantize"`` (never a packed kernel) or a
            registered kernel name.
        cache_dequantized: keep the dequantized weight between calls of the fallback path
            (faster, but gives back the memory quantization saved).
        allow_bf16: let kernels that compute in bfloat16 (PyTorch's packed int4/int8 CPU
            kernels) serve float32 inputs: faster for a few tokens, about 3 significant digits.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spec: QuantSpec | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        kernel: str = "auto",
        cache_dequantized: bool = False,
        allow_bf16: bool = False,
    ) -> None:
        super().__init__()
        for arg, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"{arg} must be a non-negative int, got {value!r}")
        for arg, value in (
            ("bias", bias),
            ("cache_dequantized", cache_dequantized),
            ("allow_bf16", allow_bf16),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{arg} must be a bool, got {value!r}")
        spec = spec if spec is not None else QuantSpec()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        if dtype not in FLOAT_DTYPES.values():
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        get_grid(spec.grid).check_spec(spec)
        _check_kernel_name(kernel)
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.weight_dtype = dtype
        self._kernel = kernel
        self._cache_dequantized = cache_dequantized
        self._allow_bf16 = allow_bf16
        layout = BlockLayout.of((out_features, in_features), spec)
        shapes = layout.expected_shapes(spec)
        self.register_buffer(
            "packed", torch.zeros(shapes["packed"], dtype=torch.uint8, device=device)
        )
        scale_dtype = FLOAT_DTYPES[spec.scale_dtype]
        self.register_buffer("scale", torch.ones(shapes["scale"], dtype=scale_dtype, device=device))
        zero = None
        if "zero" in shapes:
            zero_dtype = scale_dtype if spec.zero_point == "float" else torch.uint8
            zero = torch.zeros(shapes["zero"], dtype=zero_dtype, device=device)
        self.register_buffer("zero", zero)
        signs = None
        if "signs" in shapes:
            signs = torch.zeros(shapes["signs"], dtype=torch.uint8, device=device)
        self.register_buffer("signs", signs)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._reset_caches()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        spec: QuantSpec,
        *,
        name: str = "weight",
        kernel: str = "auto",
        cache_dequantized: bool = False,
        allow_bf16: bool = False,
    ) -> QuantLinear:
        """Quantize ``linear.weight`` (float32/float16/bfloat16 ``[out, in]``) with ``spec``.

        The bias (``[out]``) is copied as is, as trainable as before. ``name`` is how errors
        refer to the layer. A `QuantLinear` is refused rather than quantized again: its weight
        already carries rounding error, and a second rounding would add to it.

        Raises:
            TypeError: ``linear`` is not an `nn.Linear` (a `QuantLinear`, say), ``spec`` not a
                `QuantSpec`, or the weight not float32/float16/bfloat16.
            ValueError: the weight is on the meta device or holds NaN/Inf, or ``spec`` does
                not fit its grid.
        """
        if isinstance(linear, QuantLinear):
            raise TypeError(
                f"{name} is already a QuantLinear ({linear.spec.label}): quantizing it again "
                "would compound the rounding error; quantize the original float layer instead"
            )
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"from_linear takes an nn.Linear, got {type(linear).__name__}"
                + (" (quantize_model handles Conv1D)" if type(linear).__name__ == "Conv1D" else "")
            )
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        if linear.weight.is_meta or (linear.bias is not None and linear.bias.is_meta):
            raise ValueError(f"{name} is on the meta device (no data): load real weights first")
        qt = quantize(linear.weight.detach(), spec, name=name)
        bias = None if linear.bias is None else linear.bias.detach()
        layer = cls.from_quantized(
            qt, bias, kernel=kernel, cache_dequantized=cache_dequantized, allow_bf16=allow_bf16
        )
        if linear.bias is not None:
            # As trainable as before (and as a freshly built or loaded QuantLinear).
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    @classmethod
    def from_quantized(
        cls,
        qt: QuantizedTensor,
        bias: torch.Tensor | None = None,
        *,
        kernel: str = "auto",
        cache_dequantized: bool = False,
        allow_bf16: bool = False,
    ) -> QuantLinear:
        """Wrap a 2-D `QuantizedTensor` ``[out, in]`` and an optional float bias ``[out]``.

        The layer shares ``qt``'s tensors (no copy) and copies the bias.

        Raises:
            TypeError: ``qt`` is not a `QuantizedTensor`, ``bias`` not a float32/float16/
                bfloat16 tensor.
            ValueError: ``qt`` is not 2-D, its tensors do not match its spec and shape (shape,
                dtype, non-finite scales, a zero point or signs the spec does not have), sit on
                different devices or on the meta device; ``bias`` has the wrong shape or sits
                on another device than ``qt``.
        """
        _check_quantized(qt)
        out_features, in_features = qt.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
            if bias.dtype not in FLOAT_DTYPES.values():
                raise TypeError(f"bias must be float32, float16 or bfloat16, got {bias.dtype}")
            if tuple(bias.shape) != (out_features,):
                raise ValueError(f"bias has shape {list(bias.shape)}, expected [{out_features}]")
            if bias.device != qt.device:
                raise ValueError(
                    f"bias is on {bias.device} ({'no data' if bias.is_meta else 'data'}), the "
                    f"quantized weight on {qt.device}: put both on one device"
                )
        layer = cls(
            in_features,
            out_features,
            bias is not None,
            qt.spec,
            dtype=qt.dtype,
            device="meta",
            kernel=kernel,
            cache_dequantized=cache_dequantized,
            allow_bf16=allow_bf16,
        )
        layer.packed, layer.scale, layer.zero, layer.signs = qt.packed, qt.scale, qt.zero, qt.signs
        if bias is not None:
            layer.bias = nn.Parameter(bias.clone(), requires_grad=bias.requires_grad)
        return layer

    @property
    def kernel(self) -> str:
        """``"auto"``, ``"dequantize"`` or a registered kernel name (settable)."""
        return self._kernel

    @kernel.setter
    def kernel(self, name: str) -> None:
        _check_kernel_name(name)
        self._kernel = name
        self._reset_caches()

    @property
    def cache_dequantized(self) -> bool:
        """Keep the dequantized weight between fallback calls (settable; False frees it)."""
        return self._cache_dequantized

    @cache_dequantized.setter
    def cache_dequantized(self, keep: bool) -> None:
        if not isinstance(keep, bool):
            raise TypeError(f"cache_dequantized must be a bool, got {keep!r}")
        self._cache_dequantized = keep
        if not keep:
            self._dequantized = None

    @property
    def quantized_weight(self) -> QuantizedTensor:
        """The weight as a `QuantizedTensor` (shares this layer's buffers)."""
        return QuantizedTensor(
            self.packed,
            self.scale,
            self.zero,
            self.spec,
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
            self.signs,
        )

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The restored weight ``[out, in]``; ``dtype`` defaults to the original weight's."""
        return self.quantized_weight.dequantize(dtype)

    @property
    def allow_bf16(self) -> bool:
        """Whether bfloat16-computing kernels may serve float32 inputs (settable)."""
        return self._allow_bf16

    @allow_bf16.setter
    def allow_bf16(self, allow: bool) -> None:
        if not isinstance(allow, bool):
            raise TypeError(f"allow_bf16 must be a bool, got {allow!r}")
        self._allow_bf16 = allow
        self._plans.clear()

    def plan(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Plan:
        """The paths this layer's forward takes by batch size for ``dtype`` inputs (default:
        the original weight's dtype) on ``device`` (default: the buffers')."""
        device = torch.device(device) if device is not None else self.packed.device
        dtype = dtype or self.weight_dtype
        key = (device, dtype)
        if self._planned_at != kernel_registry.changes():
            self._plans.clear()  # a kernel registered or a dispatch table re-read since
            self._planned_at = kernel_registry.changes()
        plan = self._plans.get(key)
        if plan is None:
            if self.kernel not in ("auto", DEQUANTIZE):
                kernel = get_kernel(self.kernel)
                if not kernel.supports(self.quantized_weight, device):
                    raise ValueError(
                        f"kernel {self.kernel!r} does not support {self.spec.label} on {device}"
                    )
            plan = self._plans[key] = plan_for(
                self.quantized_weight,
                device,
                dtype,
                allow_bf16=self.allow_bf16,
                kernel=self.kernel,
            )
        return plan

    def selected_kernel(self, device: torch.device | None = None) -> Kernel | None:
        """The kernel a one-token forward in the weight's dtype runs on ``device`` (default:
        the buffers'), or None when it dequantizes."""
        path = self.plan(device).path(1)
        return None if path in (DEQUANTIZE, DEQUANTIZE_FP32) else get_kernel(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features]`` (float) -> ``[..., out_features]`` in ``x``'s dtype."""
        if x.dim() == 0:
            raise ValueError("QuantLinear expects inputs of at least one dimension")
        if not x.is_floating_point():
            raise TypeError(f"QuantLinear expects floating-point inputs, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"QuantLinear expects inputs with last dim {self.in_features}, got {list(x.shape)}"
            )
        if self.signs is not None:
            # The codes hold W R^T: rotate the input the same way (x W^T = x R^T (W R^T)^T).
            x = rotate(x, self._sign_vector(x.device))
        tokens = x.numel() // max(1, self.in_features)
        path = self.plan(x.device, x.dtype).path(tokens)
        if path not in (DEQUANTIZE, DEQUANTIZE_FP32):
            kernel = get_kernel(path)
            prepared = self._prepared_for(kernel, x.device)
            if torch.is_grad_enabled() and x.requires_grad:
                # Packed kernels have no backward: route the input gradient through the
                # dequantized weight; the bias is added outside so its gradient flows as usual.
                y = _KernelMatmul.apply(x, self, kernel, prepared)
                return y if self.bias is None else y + self.bias.to(y.dtype)
            return kernel.run(x, prepared, self.bias)
        compute = torch.float32 if path == DEQUANTIZE_FP32 else x.dtype
        weight = self._weight_for(compute, torch.is_grad_enabled() and x.requires_grad)
        bias = None if self.bias is None else self.bias.to(compute)
        return F.linear(x.to(compute), weight, bias).to(x.dtype)

    def _prepared_for(self, kernel: Kernel, device: torch.device) -> dict:
        # Kernel layouts are derived, machine-specific data: built on first use, never saved.
        key = (kernel.name, device)
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = kernel.prepare(self.quantized_weight)
        return prepared

    def _weight_for(self, dtype: torch.dtype, kept_for_backward: bool) -> torch.Tensor:
        if self._dequantized is not None and self._dequantized.dtype == dtype:
            return self._dequantized
        qt = self.quantized_weight
        if self.cache_dequantized or kept_for_backward:
            weight = qt.dequantize(dtype, rotated=True)
            if self.cache_dequantized:
                self._dequantized = weight
            return weight
        # Used once and dropped: fill a reusable per-thread buffer instead of a fresh
        # allocation, whose page faults cost more than the dequantization itself.
        return qt.dequantize(dtype, out=scratch(qt.shape, dtype, qt.device), rotated=True)

    def _sign_vector(self, device: torch.device) -> torch.Tensor:
        if self._signs is None or self._signs.device != device:
            self._signs = unpack_signs(self.signs, self.in_features).to(device)
        return self._signs

    def _reset_caches(self) -> None:
        """Forget everything derived from the buffers (kernel choice and layout, float weight)."""
        self._signs: torch.Tensor | None = None
        self._plans: dict[tuple[torch.device, torch.dtype], Plan] = {}
        self._planned_at = kernel_registry.changes()
        self._prepared: dict[tuple[str, torch.device], dict] = {}
        self._dequantized: torch.Tensor | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        # Loading overwrites the buffers in place: derived kernel layouts would go stale.
        self._reset_caches()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # Scales (and float zero points) keep their stored dtype under model.half()/.to(dtype):
        # a cast would change the quantized values and break the spec. Only the device follows.
        self._reset_caches()
        kept = {name: self._buffers.pop(name) for name in ("scale", "zero")}
        try:
            result = super()._apply(fn, recurse)
        finally:
            target = fn(torch.zeros(1, device=kept["scale"].device)).device
            for name, tensor in kept.items():
                self._buffers[name] = None if tensor is None else tensor.to(target)
        return result

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, spec={self.spec.label!r}"
        )


def _check_kernel_name(kernel: str) -> None:
    if not isinstance(kernel, str):
        raise TypeError(
            f"kernel must be a str ('auto', 'dequantize' or a kernel name), got {kernel!r}"
        )
    if kernel not in ("auto", "dequantize"):
        get_kernel(kernel)


def _check_quantized(qt: QuantizedTensor) -> None:
    """Refuse a `QuantizedTensor` a layer cannot be built on, before it is wrapped."""
    if not isinstance(qt, QuantizedTensor):
        hint = " (quantize it first: lowbit.quantize(tensor, spec))"
        raise TypeError(
            f"qt must be a QuantizedTensor, got {type(qt).__name__}"
            + (hint if isinstance(qt, torch.Tensor) else "")
        )
    if not isinstance(qt.spec, QuantSpec):
        raise TypeError(f"qt.spec must be a QuantSpec, got {type(qt.spec).__name__}")
    if len(qt.shape) != 2:
        raise ValueError(f"QuantLinear needs a 2-D weight, got shape {list(qt.shape)}")
    if qt.dtype not in FLOAT_DTYPES.values():
        raise TypeError(f"qt.dtype must be float32, float16 or bfloat16, got {qt.dtype}")
    tensors = {"packed": qt.packed, "scale": qt.scale, "zero": qt.zero, "signs": qt.signs}
    present = {k: v for k, v in tensors.items() if v is not None}
    for key, value in present.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"qt.{key} must be a tensor, got {type(value).__name__}")
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        raise ValueError(f"qt's tensors are on several devices: {sorted(map(str, devices))}")
    if qt.packed.is_meta:
        raise ValueError("qt is on the meta device (no data): load real tensors first")
    expected = BlockLayout.of(qt.shape, qt.spec).expected_shapes(qt.spec)
    extra = sorted(set(present) - set(expected))
    if extra:
        # dequantize would use them: a symmetric spec with a zero point restores wrong values.
        raise ValueError(f"qt has {extra} that its spec ({qt.spec.label}) does not store")
    try:
        QuantizedTensor.from_state(present, qt.metadata())
    except ValueError as err:
        raise ValueError(f"qt does not match its spec and shape: {err}") from None


class _KernelMatmul(torch.autograd.Function):
    """``x @ W.T`` through a packed kernel; backward ``grad @ W`` with ``W`` dequantized."""

    @staticmethod
    def forward(ctx, x, layer, kernel, prepared):
        ctx.layer = layer
        return kernel.run(x, prepared, None)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.layer.quantized_weight.dequantize(grad.dtype, rotated=True)
        return grad @ weight, None, None, None


