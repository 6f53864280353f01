"""lowbit.compat.distquant vs the real distquant 0.1.0 on all-MiniLM-L6-v2's Linear weights.

The natural use, and what is measured: one ``quantize(w, k=k, dist=None)`` call per Linear
weight (37 matrices, 10.8M weights: 6 layers x (q, k, v, attention output, intermediate,
output) + the pooler; embeddings are not Linear weights), packed codes (the default). For each
``k`` it prints the total wall time of the loop and the mean absolute error over all weights
(each tensor's ``info['abs_error']`` weighted by its size) for both libraries, the speedup, and
on how many tensors ours is at least as accurate.

Usage: ``.venv/bin/python benchmarks/bench_distquant.py [--bits 2 3 4] [--reps 3] [--threads N]``.
distquant runs once per ``k`` (it is slow); ours is the median of ``--reps`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lowbit.compat import distquant as ours  # noqa: E402
from lowbit.models import minilm_dir  # noqa: E402


def linear_weights() -> dict[str, torch.Tensor]:
    """MiniLM's Linear weights (2-D ``*.weight`` outside the embeddings), fp32."""
    state = load_file(minilm_dir() / "model.safetensors")
    return {
        name: w
        for name, w in state.items()
        if name.endswith(".weight") and w.ndim == 2 and "embeddings" not in name
    }


def run(quantize, weights: dict[str, torch.Tensor], k: int) -> tuple[float, list[dict]]:
    """Seconds for one ``quantize(w, k=k, dist=None)`` per weight, and the infos."""
    start = time.perf_counter()
    infos = [quantize(w, k=k, dist=None)[1] for w in weights.values()]
    return time.perf_counter() - start, infos


def mean_abs_error(infos: list[dict]) -> float:
    total = sum(info["abs_error"] * info["n_elems"] for info in infos)
    return total / sum(info["n_elems"] for info in infos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both libraries (on a shared machine 1 avoids the OpenMP "
        "oversubscription stalls that made 2-thread runs up to 8x slower)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from distquant.distquant import quantize as reference
    except ImportError:  # a peer that is not installed skips its rows
        reference = None
        print("distquant is not installed (pip install distquant==0.1.0): its rows are skipped")

    weights = linear_weights()
    count = sum(w.numel() for w in weights.values())
    print(f"# {machine()}")
    print(f"# all-MiniLM-L6-v2: {len(weights)} Linear weights, {count:,} values, dist=None\n")
    print(
        "| k | distquant s | lowbit s | speedup | distquant MAE | lowbit MAE | lowbit/distquant "
        "MAE | tensors lowbit <= distquant |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for k in args.bits:
        run(ours.quantize, dict(list(weights.items())[:2]), k)  # warm-up
        times, infos = [], None
        for _ in range(args.reps):
            seconds, infos = run(ours.quantize, weights, k)
            times.append(seconds)
        ours_s, ours_mae = statistics.median(times), mean_abs_error(infos)
        if reference is None:
            print(f"| {k} | - | {ours_s:.3f} | - | - | {ours_mae:.6g} | - | - |")
            continue
        ref_s, ref_infos = run(reference, weights, k)
        ref_mae = mean_abs_error(ref_infos)
        # 1e-6 relative slack: ours sums in float64, distquant in float32.
        better = sum(
            a["abs_error"] <= b["abs_error"] * (1 + 1e-6)
            for a, b in zip(infos, ref_infos, strict=True)
        )
        print(
            f"| {k} | {ref_s:.2f} | {ours_s:.3f} | {ref_s / ours_s:.0f}x | {ref_mae:.6g} | "
            f"{ours_mae:.6g} | {ours_mae / ref_mae:.4f} | {better}/{len(infos)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
