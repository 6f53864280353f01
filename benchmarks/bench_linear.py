"""QuantLinear against nn.Linear at every batch size, the path each batch takes, and the
dequantize path's bandwidth for every format (issue 15's targets).

Run: .venv/bin/python benchmarks/bench_linear.py [--quick]

Table 1: 4096x4096 and 11008x4096 (out x in), int8 per channel (sym, asym) and int4 g64, with
bf16 inputs against bf16 nn.Linear and with fp32 inputs against fp32 nn.Linear (fp32-accurate
output: no bf16 kernel serves fp32 inputs). Ratio = nn.Linear time / QuantLinear time (> 1:
faster). Table 2: every other format at 4096x4096 (the ragged g128 case at 1536x576):
dequantize time against a plain copy of the same output (the bandwidth target: >= 50% of a
copy's), and QuantLinear at 64 and 256 tokens against bf16 and fp32 nn.Linear.
Medians; baselines measured in the same run, right beside each figure.
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
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
FORMATS = {
    "int8 sym": lowbit.QuantSpec(bits=8, symmetric=True),
    "int8 asym": lowbit.QuantSpec(bits=8),
    "int4 g64": lowbit.QuantSpec(bits=4, group_size=64),
}
OTHER_FORMATS = {
    "int3 g64": (lowbit.QuantSpec(bits=3, group_size=64), (4096, 4096)),
    "int2 g64": (lowbit.QuantSpec(bits=2, group_size=64), (4096, 4096)),
    "nf4 g64": (lowbit.QuantSpec(bits=4, grid="nf4", group_size=64), (4096, 4096)),
    "gaussian3 g64 (Lloyd-Max)": (
        lowbit.QuantSpec(bits=3, grid="gaussian", group_size=64), (4096, 4096)
    ),
    "int4 g64 float zero": (
        lowbit.QuantSpec(bits=4, group_size=64, zero_point="float"), (4096, 4096)
    ),
    "int4 g128 ragged (576 in)": (lowbit.QuantSpec(bits=4, group_size=128), (576, 1536)),
    "int4 g64 hadamard": (
        lowbit.QuantSpec(bits=4, group_size=64, rotation="hadamard"), (4096, 4096)
    ),
}


def timed(layer: nn.Module, x: torch.Tensor, reps: int) -> float:
    with torch.inference_mode():
        return median_seconds(lambda: layer(x), reps=reps, warmup=1)


def reps_for(tokens: int, out_features: int) -> int:
    return 15 if tokens <= 64 else (5 if tokens * out_features <= 512 * 4096 else 3)


def batch_table(k: int, n: int, tokens_list: list[int]) -> None:
    linear = nn.Linear(k, n, bias=False)
    linear_bf16 = nn.Linear(k, n, bias=False).to(torch.bfloat16)
    linear_bf16.weight.data.copy_(linear.weight.data)
    quant = {f: lowbit.QuantLinear.from_linear(linear, spec) for f, spec in FORMATS.items()}
    print(f"\n### {n}x{k} (out x in)\n")
    cols = ["bf16 Linear", "fp32 Linear"]
    cols += [f"{f} ({a} in)" for f in FORMATS for a in ("bf16", "fp32")]
    print("| tokens | " + " | ".join(cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for tokens in tokens_list:
        reps = reps_for(tokens, n)
        x32 = torch.randn(tokens, k)
        x16 = x32.to(torch.bfloat16)
        base16 = timed(linear_bf16, x16, reps)
        base32 = timed(linear, x32, reps)
        cells = [f"{base16 * 1e3:.2f}", f"{base32 * 1e3:.2f}"]
        for layer in quant.values():
            for x, base in ((x16, base16), (x32, base32)):
                t = timed(layer, x, reps)
                path = layer.plan(dtype=x.dtype).path(tokens)
                cells.append(f"{t * 1e3:.2f} ({base / t:.2f}x, {path})")
        print(f"| {tokens} | " + " | ".join(cells) + " |", flush=True)


def format_table() -> None:
    print("\n### Every other format: dequantize bandwidth and QuantLinear at 64 / 256 tokens\n")
    print(
        "| format | shape | dequantize -> bf16 ms | bf16 copy ms | copy / dequantize | "
        "64 tok vs bf16 / fp32 Linear | 256 tok vs bf16 / fp32 Linear |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (spec, (k, n)) in OTHER_FORMATS.items():
        linear = nn.Linear(k, n, bias=False)
        linear_bf16 = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        linear_bf16.weight.data.copy_(linear.weight.data)
        layer = lowbit.QuantLinear.from_linear(linear, spec)
        qt = layer.quantized_weight
        out = torch.empty(n, k, dtype=torch.bfloat16)
        source = torch.empty_like(out)
        deq = median_seconds(lambda qt=qt, out=out: qt.dequantize(out=out, rotated=True), 15, 2)
        copy = median_seconds(lambda out=out, source=source: out.copy_(source), 15, 2)
        cells = [name, f"{n}x{k}", f"{deq * 1e3:.2f}", f"{copy * 1e3:.2f}", f"{copy / deq:.2f}"]
        for tokens in (64, 256):
            x32 = torch.randn(tokens, k)
            x16 = x32.to(torch.bfloat16)
            reps = reps_for(tokens, n)
            q16, b16 = timed(layer, x16, reps), timed(linear_bf16, x16, reps)
            q32, b32 = timed(layer, x32, reps), timed(linear, x32, reps)
            cells.append(f"{b16 / q16:.2f}x / {b32 / q32:.2f}x")
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    quick = "--quick" in sys.argv
    torch.manual_seed(0)
    print(f"# QuantLinear vs nn.Linear; {machine()}")
    print(
        "Medians in ms; (ratio, path): nn.Linear time of the same input dtype / QuantLinear "
        "time (> 1: faster), and the path QuantLinear's plan took."
    )
    for k, n in SHAPES[:1] if quick else SHAPES:
        batch_table(k, n, TOKENS[:7] if quick or n > 4096 else TOKENS)
    format_table()


if __name__ == "__main__":
    main()
