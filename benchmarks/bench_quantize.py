"""Quantize throughput: GB/s of fp32 input for a 4096x11008 matrix.

Run: .venv/bin/python benchmarks/bench_quantize.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_seconds  # noqa: E402

import lowbit  # noqa: E402

SPECS = {
    "int8 per-channel asym": lowbit.QuantSpec(bits=8),
    "int8 per-channel sym": lowbit.QuantSpec(bits=8, symmetric=True),
    "int4 g64 asym": lowbit.QuantSpec(bits=4, group_size=64),
    "int4 g64 sym": lowbit.QuantSpec(bits=4, group_size=64, symmetric=True),
    "int3 g64 asym": lowbit.QuantSpec(bits=3, group_size=64),
    "int2 g64 asym": lowbit.QuantSpec(bits=2, group_size=64),
}


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4096, 11008)
    gigabytes = weight.numel() * 4 / 1e9
    print(f"# quantize 4096x11008 fp32 ({gigabytes * 1e3:.0f} MB); {machine()}")
    print("| spec | median s | GB/s of fp32 input | bits/weight |")
    print("| --- | --- | --- | --- |")
    for label, spec in SPECS.items():
        seconds = median_seconds(lambda spec=spec: lowbit.quantize(weight, spec), reps=9, warmup=2)
        bpw = lowbit.quantize(weight, spec).bits_per_weight
        print(f"| {label} | {seconds:.3f} | {gigabytes / seconds:.2f} | {bpw:.4f} |")


if __name__ == "__main__":
    main()
