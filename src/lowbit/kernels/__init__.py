"""Matmul kernels for quantized weights, chosen by a small registry."""

from lowbit.kernels import native_cpu as _native_cpu  # noqa: F401  (registers lowbit's own)
from lowbit.kernels import torch_cpu as _torch_cpu  # noqa: F401  (registers the CPU kernels)
from lowbit.kernels import torch_cuda as _torch_cuda  # noqa: F401  (registers the CUDA kernel)
from lowbit.kernels.registry import (
    DEQUANTIZE,
    Kernel,
    available_kernels,
    get_kernel,
    register_kernel,
    select_kernel,
)

__all__ = [
    "DEQUANTIZE",
    "Kernel",
    "available_kernels",
    "get_kernel",
    "register_kernel",
    "select_kernel",
]
