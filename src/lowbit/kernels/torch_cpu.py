"""PyTorch's own packed weight-only CPU kernels, wrapped as lowbit kernels.

Both take bf16 activations (with fp32 activations they are 20-40x slower, see
``docs/benchmarks.md``), so activations are cast to bf16 around the call and the result is cast
back: the layer's output then carries bf16 rounding of the activations (about 3 significant
digits), as torchao's and gpt-fast's CPU int4 paths do.
"""

from __future__ import annotations

import torch

from lowbit.kernels.registry import (
    Kernel,
    finish_output,
    int4_codes_and_scales,
    register_kernel,
)
from lowbit.tensor import QuantizedTensor

INT4_GROUP_SIZES = (32, 64, 128, 256)


def _is_cpu_int(qt: QuantizedTensor, device: torch.device) -> bool:
    return device.type == "cpu" and qt.spec.grid == "int" and len(qt.shape) == 2 and qt.numel() > 0


def _int4_group(qt: QuantizedTensor) -> int | None:
    lay = qt.layout
    return lay.group_len if lay.scale_rows == lay.rows and not lay.ragged else None


def _supports_int4(qt: QuantizedTensor, device: torch.device) -> bool:
    if not _is_cpu_int(qt, device) or qt.spec.bits > 4:
        return False
    group = _int4_group(qt)
    return group in INT4_GROUP_SIZES and qt.shape[0] % 16 == 0


def _prepare_int4(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    codes, scales_and_zeros = int4_codes_and_scales(qt)
    weight = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    group = torch.tensor(qt.layout.group_len)
    return {"weight": weight, "scales_and_zeros": scales_and_zeros, "group": group}


def _run_int4(x, prepared, bias):
    # The CPU kernels need a row-contiguous activation matrix (transposed inputs crash).
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    group = int(prepared["group"])
    y = torch._weight_int4pack_mm_for_cpu(
        x2, prepared["weight"], group, prepared["scales_and_zeros"]
    )
    return finish_output(y, x, bias)


def _supports_int8(qt: QuantizedTensor, device: torch.device) -> bool:
    # torch 2.13's CPU kernel reads past the row (segfault) unless in_features % 16 == 0.
    return (
        _is_cpu_int(qt, device)
        and qt.spec.granularity in ("channel", "tensor")
        and qt.shape[1] % 16 == 0
    )


def _prepare_int8(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    # w = (q - z) * s = (q - c) * s - (z - c) * s with c the grid centre, so int8 codes q - c go
    # to the kernel and the rank-1 term (z - c) * s * sum(x) is subtracted afterwards.
    center = 1 << (qt.spec.bits - 1)
    rows = qt.shape[0]
    weight = (qt.codes().to(torch.int16) - center).to(torch.int8)
    scale = qt.scale.to(torch.float32).reshape(-1).expand(rows)
    zero_shift = (qt.zero_points().reshape(-1) - center).expand(rows) * scale
    prepared = {"weight": weight, "scale": scale.to(torch.bfloat16).contiguous()}
    if bool(zero_shift.any()):
        prepared["zero_shift"] = zero_shift.contiguous()
    return prepared


def _run_int8(x, prepared, bias):
    # The CPU kernels need a row-contiguous activation matrix (transposed inputs crash).
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    y = torch._weight_int8pack_mm(x2, prepared["weight"], prepared["scale"])
    if "zero_shift" in prepared:
        y = y.float() - x2.float().sum(-1, keepdim=True) * prepared["zero_shift"]
    return finish_output(y, x, bias)


# PyTorch's own kernels: priority 10, so a faster kernel for the same formats registers above
# them (and a fallback for formats they do not take, below).
register_kernel(
    Kernel("cpu_int4pack", _supports_int4, _prepare_int4, _run_int4, max_tokens=64, priority=10)
)
register_kernel(
    Kernel("cpu_int8pack", _supports_int8, _prepare_int8, _run_int8, max_tokens=48, priority=10)
)
