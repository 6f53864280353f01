"""The kernel interface and registry.

A kernel computes ``x @ dequantize(qt).T`` without materialising the float weight. It has:

* ``supports(qt, device) -> bool``: whether it can run this format on this device type;
* ``prepare(qt) -> dict``: its own weight layout (tensors, and any settings it needs), derived
  from the canonical `QuantizedTensor` (never stored on disk: storage depends on the spec, not
  the machine);
* ``run(x, prepared, bias) -> Tensor``: the matmul, ``x`` of shape ``[tokens, in_features]``;
* ``max_tokens``: above this many rows of ``x`` dequantize + ``F.linear`` is faster (measured in
  ``benchmarks/bench_linear.py``), so `QuantLinear` falls back to it;
* ``priority``: kernels are tried highest priority first (registration order among equals);
  the first that supports the format wins. A faster kernel for a format some kernel already
  serves registers with a higher priority instead of depending on import order.
* ``fp32_exact``: whether a float32 input is computed in float32 (output within float32
  rounding of ``F.linear`` with the dequantized weight). Kernels that compute in bfloat16 are
  used for float32 inputs only when the layer allows it (``QuantLinear.allow_bf16``).

Which kernel runs a batch of a given size is decided per format and token count by
`lowbit.kernels.dispatch`, from measured timings; ``priority`` and ``max_tokens`` are what it
falls back to for formats its table does not cover.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.tensor import QuantizedTensor


@dataclass(frozen=True)
class Kernel:
    """A weight-only matmul for some formats (fields described in the module docstring)."""

    name: str
    supports: Callable[[QuantizedTensor, torch.device], bool]
    prepare: Callable[[QuantizedTensor], dict]
    run: Callable[[torch.Tensor, dict, torch.Tensor | None], torch.Tensor]
    max_tokens: int
    priority: int = 0
    fp32_exact: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Kernel.name must be a non-empty str, got {self.name!r}")
        for field in ("supports", "prepare", "run"):
            if not callable(getattr(self, field)):
                raise TypeError(f"Kernel {self.name!r}: {field} must be callable")
        tokens = self.max_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise TypeError(f"Kernel {self.name!r}: max_tokens must be an int >= 0, got {tokens!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError(f"Kernel {self.name!r}: priority must be an int, got {self.priority!r}")
        if not isinstance(self.fp32_exact, bool):
            raise TypeError(
                f"Kernel {self.name!r}: fp32_exact must be a bool, got {self.fp32_exact!r}"
            )


# What QuantLinear does when no kernel takes a batch: dequantize, then F.linear.
DEQUANTIZE = "dequantize"


_KERNELS: dict[str, Kernel] = {}
# Bumped whenever what a layer's plan depends on changes (a kernel registered, a dispatch table
# re-read): layers compare it with the value they planned at.
_changes = [0]


def note_change() -> None:
    """Make every layer plan again on its next forward."""
    _changes[0] += 1


def changes() -> int:
    """How many times `note_change` ran (a layer's plans are current while this is unchanged)."""
    return _changes[0]


def register_kernel(kernel: Kernel) -> Kernel:
    """Add ``kernel``; names are unique, and ``"auto"`` / ``"dequantize"`` are taken by
    `QuantLinear`'s own settings."""
    if not isinstance(kernel, Kernel):
        raise TypeError(f"register_kernel takes a Kernel, got {type(kernel).__name__}")
    if kernel.name in ("auto", "dequantize"):
        raise ValueError(f"kernel name {kernel.name!r} is reserved for QuantLinear's settings")
    if kernel.name in _KERNELS:
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    _KERNELS[kernel.name] = kernel
    note_change()
    return kernel


def get_kernel(name: str) -> Kernel:
    """The kernel registered as ``name``; an unknown name raises listing the registered ones."""
    if not isinstance(name, str):
        raise TypeError(f"kernel name must be a str, got {name!r}")
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; registered: {sorted(_KERNELS)}") from None


def available_kernels() -> list[str]:
    """Names of all registered kernels, in the order `select_kernel` tries them."""
    return [kernel.name for kernel in _by_priority()]


def _by_priority() -> list[Kernel]:
    # sorted() is stable: registration order among equal priorities.
    return sorted(_KERNELS.values(), key=lambda kernel: -kernel.priority)


def finish_output(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel's last step: shape ``y [tokens, out]`` like ``x``, cast to ``x``'s dtype, then
    add the bias in that dtype (so kernel and fallback paths add it the same way)."""
    y = y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def int4_codes_and_scales(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and bf16 ``[groups, N, 2]`` (scale, zero) for kernels restoring
    ``(q' - 8) * scale + zero`` per group (PyTorch's int4 kernels, CPU and CUDA).

    Ours is ``(q - z) * scale``. Codes move so that the grid centre ``c`` sits at 8
    (``q' = q + 8 - c``, uint8 ``[N, K]``) and ``zero = (c - z) * scale``: both terms then stay
    as small as the weight, so their bf16 rounding does too (with ``q' = q``, 2- and 3-bit
    weights came out of two large cancelling terms, 3-4% off).
    """
    center = 1 << (qt.spec.bits - 1)
    codes = qt.codes() + (8 - center)
    scale = qt.scale.to(torch.float32)
    zero = (center - qt.zero_points()) * scale
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return codes, scales_and_zeros


def select_kernel(qt: QuantizedTensor, device: torch.device | str) -> Kernel | None:
    """The highest-priority registered kernel that supports ``qt`` on ``device``, or ``None``.

    ``device`` may be a `torch.device` or a name (``"cpu"``, ``"cuda:0"``).
    """
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    device = torch.device(device)
    for kernel in _by_priority():
        if kernel.supports(qt, device):
            return kernel
    return None
