"""lowbit's own CPU kernel (`lowbit.native`'s fused linear), wrapped as a lowbit kernel.

It restores the weight in float32 inside the matmul, eight weights at a time, from any
dense-layout format (every grid, width, zero point and group layout, ragged groups included),
and sums in float32: a float32 input gets float32-accurate output, unlike PyTorch's packed
kernels, which compute in bfloat16. It reads the canonical codes in place (no second copy of the
weight). It is fastest for a few tokens; the dispatch table (`lowbit.kernels.dispatch`) says up
to how many, per format. `cpu_native_tiled` serves larger batches: the weight restored a
cache-sized tile at a time, each tile multiplied by PyTorch's GEMM while it is in cache.
"""

from __future__ import annotations

import torch

from lowbit import native
from lowbit.kernels.registry import Kernel, finish_output, register_kernel
from lowbit.tensor import QuantizedTensor
from lowbit.workspace import scratch


def _supports(qt: QuantizedTensor, device: torch.device) -> bool:
    return device.type == "cpu" and len(qt.shape) == 2 and qt.numel() > 0 and native.supports(qt)


def _prepare(qt: QuantizedTensor) -> dict:
    # The operator's view of the format, built once per layer (it shares qt's tensors).
    if not native.supports(qt):  # also loads the operators
        raise RuntimeError(f"cpu_native does not take {qt.spec.label} on {qt.device}")
    return {"args": native.weight_args(qt), "out_features": qt.shape[0]}


def _run(x, prepared, bias):
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    y = torch.ops.lowbit_native.linear(x2, *prepared["args"], prepared["out_features"])
    return finish_output(y, x, bias)


def _prepare_tiled(qt: QuantizedTensor) -> dict:
    prepared = _prepare(qt)
    prepared["tile_rows"] = min(native.tile_rows(qt.shape[1]), qt.shape[0])
    return prepared


def _run_tiled(x, prepared, bias):
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    rows = prepared["tile_rows"]
    tile = scratch((rows, x2.shape[1]), torch.float32, x2.device)
    y = torch.ops.lowbit_native.linear_tiled(
        x2, *prepared["args"], prepared["out_features"], rows, tile
    )
    return finish_output(y, x, bias)


register_kernel(
    Kernel("cpu_native", _supports, _prepare, _run, max_tokens=4, priority=5, fp32_exact=True)
)
# Larger batches: restore a cache-sized tile of rows, multiply it with PyTorch's GEMM while it
# is in cache (no round trip of the whole float weight through memory). Priority below every
# small-batch kernel: the dispatch table says from how many tokens it wins.
register_kernel(
    Kernel(
        "cpu_native_tiled",
        _supports,
        _prepare_tiled,
        _run_tiled,
        max_tokens=1 << 30,
        priority=1,
        fp32_exact=True,
    )
)
