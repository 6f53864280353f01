"""Dequantize speed, every format: the native one-pass kernel against the eager PyTorch reference
and a plain copy of the same output (the memory-speed bound), 4096x4096.

Run: .venv/bin/python benchmarks/bench_dequantize.py
Both paths write into a preallocated output (as QuantLinear's workspace); medians of 15 runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_seconds  # noqa: E402

import lowbit  # noqa: E402

FORMATS = {
    "int8 channel asym": lowbit.QuantSpec(bits=8),
    "int8 g64 asym": lowbit.QuantSpec(bits=8, group_size=64),
    "int4 g64 asym": lowbit.QuantSpec(bits=4, group_size=64),
    "int4 g64 float zero": lowbit.QuantSpec(bits=4, group_size=64, zero_point="float"),
    "int4 g100 (ragged)": lowbit.QuantSpec(bits=4, group_size=100),
    "int3 g64 asym": lowbit.QuantSpec(bits=3, group_size=64),
    "int2 g64 asym": lowbit.QuantSpec(bits=2, group_size=64),
    "nf4 g64": lowbit.QuantSpec(bits=4, grid="nf4", group_size=64),
    "gaussian3 g64": lowbit.QuantSpec(bits=3, grid="gaussian", group_size=64),
}


def timed(qt, out) -> float:
    return median_seconds(lambda: qt.dequantize(out=out, rotated=True), reps=15, warmup=2)


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4096, 4096) * 0.02
    print(f"# dequantize 4096x4096; {machine()}; native built: {lowbit.native.available()}")
    print("| format | out | eager ms | native ms | copy ms | native / eager | copy / native |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, spec in FORMATS.items():
        qt = lowbit.quantize(weight, spec)
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(weight.shape, dtype=dtype)
            source = torch.empty_like(out)
            os.environ["LOWBIT_NATIVE"] = "0"
            eager = timed(qt, out)
            os.environ["LOWBIT_NATIVE"] = "1"
            fast = timed(qt, out)
            copy = median_seconds(lambda out=out, source=source: out.copy_(source), 15, 2)
            print(
                f"| {name} | {str(dtype).removeprefix('torch.')} | {eager * 1e3:.2f} | "
                f"{fast * 1e3:.2f} | {copy * 1e3:.2f} | {eager / fast:.1f}x faster | "
                f"{copy / fast:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
