"""Data-free accuracy at matched bits/weight: lowbit's grids vs bitsandbytes NF4 and HQQ.

Mean relative Frobenius error ||W - W_hat|| / ||W|| over every Linear weight of the real
all-MiniLM-L6-v2 and SmolLM2-135M-Instruct (lm_head excluded, as it is tied). Peers come from
the `bench` extra (`pip install -e '.[bench]'`); a peer that cannot be imported is reported and
skipped.

Run: .venv/bin/python benchmarks/bench_accuracy.py
"""

from __future__ import annotations

import sys
import time

import torch
from safetensors.torch import load_file

import lowbit
from lowbit.models import minilm_dir, smollm2_dir


def linear_weights(directory) -> list[torch.Tensor]:
    state = load_file(str(directory / "model.safetensors"))
    names = [
        k
        for k, v in state.items()
        if k.endswith(".weight")
        and v.dim() == 2
        and "embed" not in k
        and "lm_head" not in k
        and "embeddings" not in k
    ]
    return [state[k].float() for k in sorted(names)]


def rel(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return ((w - w_hat.float()).norm() / w.norm()).item()


def ours(spec: lowbit.QuantSpec):
    def run(w):
        qt = lowbit.quantize(w, spec)
        return qt.dequantize(), qt.bits_per_weight

    return run


def bnb_nf4(blocksize: int):
    import bitsandbytes.functional as bnbf

    def run(w):
        q, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        # codes + one fp32 absmax per block
        return bnbf.dequantize_4bit(q, state), 4 + 32 / blocksize

    return run


def hqq(bits: int, group: int):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=group)

    def run(w):
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w.clone()
        layer = HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
        # codes + fp16 scale + fp16 zero per group (HQQ's default)
        return layer.dequantize(), bits + 32 / group

    return run


def methods(bits: int) -> dict:
    g = {4: 64, 3: 64, 2: 64}[bits]
    table = {
        f"HQQ {bits}-bit g{g} (peer)": ("peer", lambda: hqq(bits, g)),
        f"lowbit int{bits} g{g} asym (minmax)": (
            "ours",
            lambda: ours(lowbit.QuantSpec(bits=bits, group_size=g)),
        ),
        f"lowbit int{bits} g32 asym (minmax)": (
            "ours",
            lambda: ours(lowbit.QuantSpec(bits=bits, group_size=32)),
        ),
        f"lowbit gaussian{bits} g32": (
            "ours",
            lambda: ours(
                lowbit.QuantSpec(bits=bits, group_size=32, symmetric=True, grid="gaussian")
            ),
        ),
        f"lowbit gaussian{bits} g32 + Hadamard": (
            "ours",
            lambda: ours(
                lowbit.QuantSpec(
                    bits=bits, group_size=32, symmetric=True, grid="gaussian", rotation="hadamard"
                )
            ),
        ),
    }
    if bits == 4:
        table = {
            "bitsandbytes NF4 blocksize 64 (peer)": ("peer", lambda: bnb_nf4(64)),
            "lowbit nf4 g32": (
                "ours",
                lambda: ours(lowbit.QuantSpec(bits=4, group_size=32, symmetric=True, grid="nf4")),
            ),
            **table,
        }
    return table


def main() -> None:
    torch.manual_seed(0)
    models = {
        "all-MiniLM-L6-v2": linear_weights(minilm_dir()),
        "SmolLM2-135M": linear_weights(smollm2_dir()),
    }
    for bits in (4, 3, 2):
        print(f"\n### {bits} bits\n")
        print(
            "| method | bits/weight | "
            + " | ".join(f"{m} mean rel. error" for m in models)
            + " | seconds |"
        )
        print("| --- | --- | " + " | ".join("---" for _ in models) + " | --- |")
        for label, (_, make) in methods(bits).items():
            try:
                run = make()
            except ImportError as err:
                print(f"| {label} | skipped: {err} |")
                continue
            cells, bits_total, weights_total, start = [], 0.0, 0, time.perf_counter()
            for weights in models.values():
                errors = []
                for w in weights:
                    w_hat, bpw_layer = run(w)
                    errors.append(rel(w, w_hat))
                    bits_total += bpw_layer * w.numel()
                    weights_total += w.numel()
                cells.append(f"{sum(errors) / len(errors):.4f}")
            bpw = bits_total / weights_total
            seconds = time.perf_counter() - start
            print(f"| {label} | {bpw:.3f} | " + " | ".join(cells) + f" | {seconds:.1f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
