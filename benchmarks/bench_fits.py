"""Scale searches: speed against their baselines, and weight error against the HQQ package.

Speed (medians; ratios against a baseline measured in the same run):
* ``mse`` with 100 candidates vs plain round-to-nearest (``minmax``) on a 4096x11008 matrix,
  int4 g64, with the compiled scorer and with the eager loop (``LOWBIT_COMPILE=0``);
* ``DAREQuantLinear`` on a 4096x4096 layer at 4 bits vs a per-row Python loop doing DARE's own
  search (20 scales per row, its objective; written below as the baseline);
* the other fits on the same 4096x11008 matrix, for scale.

Accuracy: mean relative Frobenius error over every Linear weight of the real all-MiniLM-L6-v2
and SmolLM2-135M (tied lm_head excluded) per fit, at 4, 3 and 2 bits, group 64, with the real
HQQ package (the `bench` extra) at the same bits and group size.

Run: .venv/bin/python benchmarks/bench_fits.py [speed|accuracy] [FIT,FIT...]   (default: both,
every fit; the list limits the accuracy rows to those fits, plus the HQQ package).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_accuracy import hqq, linear_weights, rel  # noqa: E402
from common import machine, median_seconds  # noqa: E402

import lowbit  # noqa: E402
from lowbit.compat.dare_quant import DAREQuantLinear  # noqa: E402
from lowbit.models import minilm_dir, smollm2_dir  # noqa: E402


def seed_dare_row(w: torch.Tensor, bits=4, bins=128, lw=1.0, le=0.1) -> torch.Tensor:
    """DARE's search for one row, as the seed does it: 20 scales, histogram entropy."""
    qmax = 2 ** (bits - 1) - 1
    mx = w.abs().max()
    best, best_loss = None, float("inf")
    for s in torch.linspace(mx / qmax, mx, 20):
        w_hat = torch.clamp(torch.round(w / s), -qmax - 1, qmax) * s
        r = w - w_hat
        lo, hi = r.min().item(), r.max().item()
        if lo == hi:
            lo, hi = lo - 1.0, hi + 1.0
        counts = torch.histc(r, bins=bins, min=lo, max=hi)
        density = counts / (r.numel() * (hi - lo) / bins)
        entropy = -(density * torch.log(density + 1e-8)).sum()
        loss = lw * torch.mean(r**2) + le * entropy
        if loss < best_loss:
            best, best_loss = w_hat, loss.item()
    return best


def speed() -> None:
    torch.manual_seed(0)
    print(f"# speed; {machine()}\n")
    weight = torch.randn(4096, 11008)
    rtn = lowbit.QuantSpec(bits=4, group_size=64)
    print("| 4096x11008, int4 g64 | median s | x round-to-nearest |")
    print("| --- | --- | --- |")
    base = median_seconds(lambda: lowbit.quantize(weight, rtn), reps=5, warmup=1)
    print(f"| round-to-nearest (minmax) | {base:.3f} | 1.0 |")
    rows = {
        "mse, 100 candidates, compiled scorer": ("mse", {}, "1"),
        "mse, 100 candidates, eager loop": ("mse", {}, "0"),
        "mse, 100 candidates, float zero, compiled": ("mse", {"zero_point": "float"}, "1"),
        "hqq, 20 iterations": ("hqq", {}, "1"),
        "entropy (codes), 48 candidates": ("entropy", {}, "1"),
        "percentile 99.9": ("percentile", {}, "1"),
    }
    for label, (fit, extra, compile_flag) in rows.items():
        os.environ["LOWBIT_COMPILE"] = compile_flag
        spec = lowbit.QuantSpec(bits=4, group_size=64, fit=fit, **extra)
        start = time.perf_counter()
        lowbit.quantize(weight, spec)  # warm-up, includes compiling kernels
        first = time.perf_counter() - start
        reps = 3 if compile_flag == "1" and fit in ("mse", "percentile") else 1
        seconds = median_seconds(lambda spec=spec: lowbit.quantize(weight, spec), reps, 0)
        base_now = median_seconds(lambda: lowbit.quantize(weight, rtn), reps=3, warmup=0)
        print(f"| {label} | {seconds:.3f} (first call {first:.1f}) | {seconds / base_now:.1f} |")
        sys.stdout.flush()
    os.environ["LOWBIT_COMPILE"] = "1"

    print("\n| 4096x4096 layer, 4 bits | seconds | speed-up |")
    print("| --- | --- | --- |")
    linear = torch.nn.Linear(4096, 4096)
    start = time.perf_counter()
    with torch.no_grad():
        for row in linear.weight:
            seed_dare_row(row)
    loop = time.perf_counter() - start
    print(f"| per-row Python loop, DARE's search (20 scales) | {loop:.2f} | 1.0 |")
    ours = median_seconds(lambda: DAREQuantLinear(linear), reps=3, warmup=1)
    print(f"| DAREQuantLinear (40 scales, compiled, pruned) | {ours:.2f} | {loop / ours:.1f} |")
    os.environ["LOWBIT_COMPILE"] = "0"
    eager = median_seconds(lambda: DAREQuantLinear(linear), reps=1, warmup=0)
    os.environ["LOWBIT_COMPILE"] = "1"
    label = "DAREQuantLinear, eager loop (`LOWBIT_COMPILE=0`)"
    print(f"| {label} | {eager:.2f} | {loop / eager:.1f} |")


def accuracy(only: set[str] | None = None) -> None:
    models = {
        "all-MiniLM-L6-v2": linear_weights(minilm_dir()),
        "SmolLM2-135M": linear_weights(smollm2_dir()),
    }
    for bits in (4, 3, 2):
        print(f"\n### {bits} bits, group 64\n")
        print("| method | bits/weight | " + " | ".join(models) + " | seconds |")
        print("| --- | --- | " + " | ".join("---" for _ in models) + " | --- |")
        rows = {f"HQQ package {bits}-bit g64 (peer)": lambda b=bits: hqq(b, 64)}
        for fit in ("minmax", "percentile", "entropy", "hqq", "mse"):
            if only and fit not in only:
                continue
            for zero in ("int", "float"):
                spec = lowbit.QuantSpec(
                    bits=bits, group_size=64, fit=None if fit == "minmax" else fit, zero_point=zero
                )
                rows[f"lowbit {spec.label}"] = lambda s=spec: _ours(s)
        for label, make in rows.items():
            try:
                run = make()
            except ImportError as err:
                print(f"| {label} | skipped: {err} |")
                continue
            start, cells, bits_total, count = time.perf_counter(), [], 0.0, 0
            for weights in models.values():
                errors = []
                for w in weights:
                    w_hat, bpw = run(w)
                    errors.append(rel(w, w_hat))
                    bits_total += bpw * w.numel()
                    count += w.numel()
                cells.append(f"{sum(errors) / len(errors):.4f}")
            seconds = time.perf_counter() - start
            print(
                f"| {label} | {bits_total / count:.3f} | "
                + " | ".join(cells)
                + f" | {seconds:.1f} |"
            )
            sys.stdout.flush()


def _ours(spec):
    def run(w):
        qt = lowbit.quantize(w, spec)
        return qt.dequantize(), qt.bits_per_weight

    return run


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "both"
    if what in ("speed", "both"):
        speed()
    if what in ("accuracy", "both"):
        accuracy(set(sys.argv[2].split(",")) if len(sys.argv) > 2 else None)
