"""QuantLinear vs nn.Linear (fp32 and bf16) at 1, 8 and 64 tokens; and the kernel/dequantize
crossover that sets each kernel's ``max_tokens``.

Run: .venv/bin/python benchmarks/bench_linear.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_seconds  # noqa: E402

import lowbit  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008)]  # (in_features, out_features)
TOKENS = [1, 8, 64]
FORMATS = {
    "int8 channel": lowbit.QuantSpec(bits=8, symmetric=True),
    "int8 channel asym": lowbit.QuantSpec(bits=8),
    "int4 g64": lowbit.QuantSpec(bits=4, group_size=64),
}


def timed(layer: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return median_seconds(lambda: layer(x), reps=15, warmup=3)


def main() -> None:
    torch.manual_seed(0)
    print(f"# QuantLinear vs nn.Linear; {machine()}")
    print("Times: medians in ms; ratio = bf16 nn.Linear time / this time (>1: faster than bf16).")
    for k, n in SHAPES:
        linear = nn.Linear(k, n, bias=False)
        linear_bf16 = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        linear_bf16.weight.data.copy_(linear.weight.data)
        quant = {f: lowbit.QuantLinear.from_linear(linear, spec) for f, spec in FORMATS.items()}
        print(f"\n## {n}x{k} (out x in)\n")
        cols = ["fp32 Linear", "bf16 Linear"]
        cols += [f"{f} ({a})" for f in FORMATS for a in ("bf16", "fp32")]
        print("| tokens | " + " | ".join(cols) + " |")
        print("| --- " * (len(cols) + 1) + "|")
        for tokens in TOKENS:
            x32 = torch.randn(tokens, k)
            x16 = x32.to(torch.bfloat16)
            base = timed(linear_bf16, x16)
            cells = [f"{timed(linear, x32) * 1e3:.2f}", f"{base * 1e3:.2f}"]
            for layer in quant.values():
                for x in (x16, x32):
                    t = timed(layer, x)
                    cells.append(f"{t * 1e3:.2f} ({base / t:.2f}x)")
            print(f"| {tokens} | " + " | ".join(cells) + " |")

    print("\n## Crossover: packed kernel vs dequantize + F.linear, 4096x4096, bf16 activations\n")
    linear = nn.Linear(4096, 4096, bias=False)
    print("| format | tokens | kernel ms | dequantize ms |")
    print("| --- | --- | --- | --- |")
    for name, spec in FORMATS.items():
        kern = lowbit.QuantLinear.from_linear(linear, spec)
        deq = lowbit.QuantLinear.from_linear(linear, spec, kernel="dequantize")
        kernel = kern.selected_kernel()
        for tokens in (16, 32, 64, 128, 256):
            x = torch.randn(tokens, 4096, dtype=torch.bfloat16)
            prepared = kern._prepared_for(kernel, x.device)

            def run(x=x, prepared=prepared, kernel=kernel):
                return kernel.run(x, prepared, None)

            with torch.inference_mode():
                tk = median_seconds(run, 7, 2)
            td = timed(deq, x)
            print(f"| {name} | {tokens} | {tk * 1e3:.2f} | {td * 1e3:.2f} |")


if __name__ == "__main__":
    main()
