"""PyTorch's CUDA int4 weight-only kernel (tinygemm), wrapped as a lowbit kernel.

``aten._weight_int4pack_mm`` restores ``(q - 8) * scale + zero_k`` per group from weights packed
by ``aten._convert_weight_to_int4pack`` (uint8 ``[N, K/2]``, high nibble first) and bf16
``[K/group, N, 2]`` (scale, zero_k). It beats bf16 ``F.linear`` at one to eight tokens and
loses to it from about 16 (``docs/benchmarks.md``), but it stays faster than lowbit's
dequantize-then-``F.linear`` path up to about 200 tokens, hence ``max_tokens=128``.
PyTorch's CUDA int8 weight-only kernel is 4-750x slower than bf16 and is not used.
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

GROUP_SIZES = (32, 64, 128, 256)


def _inner_k_tiles(k: int) -> int | None:
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    return None


def _supports(qt: QuantizedTensor, device: torch.device) -> bool:
    if device.type != "cuda" or qt.spec.grid != "int" or qt.spec.bits > 4:
        return False
    if len(qt.shape) != 2 or qt.numel() == 0:
        return False
    lay = qt.layout
    n, k = qt.shape
    return (
        lay.scale_rows == lay.rows
        and not lay.ragged
        and lay.group_len in GROUP_SIZES
        and n % 8 == 0
        and _inner_k_tiles(k) is not None
    )


def _prepare(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    codes, scales_and_zeros = int4_codes_and_scales(qt)
    pairs = (codes[:, 0::2] << 4) | codes[:, 1::2]
    tiles = _inner_k_tiles(qt.shape[1])
    weight = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), tiles)
    group = torch.tensor(qt.layout.group_len)
    return {"weight": weight, "scales_and_zeros": scales_and_zeros, "group": group}


def _run(x, prepared, bias):
    # The kernel needs a contiguous activation matrix and at least one row.
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    if x2.shape[0] == 0:
        y = x2.new_zeros(0, prepared["scales_and_zeros"].shape[1])
    else:
        y = torch.ops.aten._weight_int4pack_mm(
            x2, prepared["weight"], int(prepared["group"]), prepared["scales_and_zeros"]
        )
    return finish_output(y, x, bias)


# PyTorch's own kernel: priority 10, as the CPU ones.
register_kernel(
    Kernel("cuda_int4_tinygemm", _supports, _prepare, _run, max_tokens=128, priority=10)
)
