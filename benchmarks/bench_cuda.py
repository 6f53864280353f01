"""GPU figures: QuantLinear (int4) vs bf16 nn.Linear, the tinygemm/dequantize crossover, and
quantize throughput.

Run on a CUDA machine: PYTHONPATH=src python3 benchmarks/bench_cuda.py
Timing: CUDA events around 50 calls after warm-up, median of 7 such runs (eager, no CUDA graph).
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

import lowbit

SHAPES = [(4096, 4096), (11008, 4096), (28672, 8192)]  # (out, in)
TOKENS = [1, 8, 16, 32, 64, 256]


def cuda_median_us(fn, inner: int = 50, runs: int = 7) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times)


def linear_table() -> None:
    head = [
        "layer (out x in)",
        "tokens",
        "bf16 nn.Linear us",
        "QuantLinear int4 g64 us",
        "vs bf16",
        "QuantLinear int4 g128 us",
        "vs bf16",
        "g64 tinygemm us",
        "g64 dequantize path us",
    ]
    print("| " + " | ".join(head) + " |")
    print("| --- " * len(head) + "|")
    g64, g128 = lowbit.QuantSpec(bits=4, group_size=64), lowbit.QuantSpec(bits=4, group_size=128)
    for n, k in SHAPES:
        linear = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        q64 = lowbit.QuantLinear.from_linear(linear, g64)
        q128 = lowbit.QuantLinear.from_linear(linear, g128)
        deq = lowbit.QuantLinear.from_linear(linear, g64, kernel="dequantize")
        kernel = q64.selected_kernel()
        for tokens in TOKENS:
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
            base, t64, t128, tdeq = (
                cuda_median_us(lambda layer=layer, x=x: layer(x))
                for layer in (linear, q64, q128, deq)
            )
            prepared = q64._prepared_for(kernel, x.device)
            tkern = cuda_median_us(lambda x=x, p=prepared, kern=kernel: kern.run(x, p, None))
            cells = [
                f"{n}x{k}",
                str(tokens),
                f"{base:.1f}",
                f"{t64:.1f}",
                f"{base / t64:.2f}x",
                f"{t128:.1f}",
                f"{base / t128:.2f}x",
                f"{tkern:.1f}",
                f"{tdeq:.1f}",
            ]
            print("| " + " | ".join(cells) + " |")


def quantize_table() -> None:
    w = torch.randn(11008, 4096, device="cuda")
    gb = w.numel() * 4 / 1e9
    print("\n| quantize 11008x4096 fp32 on GPU | us | GB/s |")
    print("| --- | --- | --- |")
    specs = {
        "int8 per-channel": lowbit.QuantSpec(bits=8),
        "int4 g64": lowbit.QuantSpec(bits=4, group_size=64),
    }
    for label, spec in specs.items():
        t = cuda_median_us(lambda spec=spec: lowbit.quantize(w, spec), inner=5, runs=5)
        print(f"| {label} | {t:.0f} | {gb / (t * 1e-6):.1f} |")


def main() -> None:
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    with torch.inference_mode():
        linear_table()
        quantize_table()


if __name__ == "__main__":
    main()
