"""GPU figures: QuantLinear (int4) vs bf16 nn.Linear, the tinygemm/dequantize crossover,
quantize throughput, and the scale searches (``mse`` vs round-to-nearest, ``DAREQuantLinear``
vs the seed's per-row loop, both on the GPU).

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
        "g64 path (plan)",
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
                q64.plan(x.device, x.dtype).path(tokens),
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


def fits_table() -> None:
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_fits import seed_dare_row

    from lowbit.compat.dare_quant import DAREQuantLinear

    w = torch.randn(4096, 11008, device="cuda")
    rtn = lowbit.QuantSpec(bits=4, group_size=64)
    mse = lowbit.QuantSpec(bits=4, group_size=64, fit="mse")
    base = cuda_median_us(lambda: lowbit.quantize(w, rtn), inner=3, runs=5)
    ours = cuda_median_us(lambda: lowbit.quantize(w, mse), inner=1, runs=3)
    print("\n| 4096x11008 int4 g64 on GPU | ms | x round-to-nearest |")
    print("| --- | --- | --- |")
    print(f"| round-to-nearest | {base / 1e3:.2f} | 1.0 |")
    print(f"| mse, 100 candidates | {ours / 1e3:.2f} | {ours / base:.1f} |")
    linear = nn.Linear(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for row in linear.weight.detach():
        seed_dare_row(row)
    torch.cuda.synchronize()
    loop = time.perf_counter() - start
    dare = cuda_median_us(lambda: DAREQuantLinear(linear), inner=1, runs=3) / 1e6
    print("\n| 4096x4096 layer, 4 bits, on GPU | s | speed-up |")
    print("| --- | --- | --- |")
    print(f"| per-row Python loop, DARE's search (20 scales) | {loop:.2f} | 1.0 |")
    print(f"| DAREQuantLinear (40 scales) | {dare:.3f} | {loop / dare:.0f} |")


def main() -> None:
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    with torch.inference_mode():
        linear_table()
        quantize_table()
    fits_table()


if __name__ == "__main__":
    main()
