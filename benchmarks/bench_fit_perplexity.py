"""End to end: SmolLM2-135M WikiText-2 perplexity per fit, against the real HQQ package.

Every Linear weight of SmolLM2-135M-Instruct except the tied lm_head is replaced by its
quantize-then-dequantize version in the fp32 model (so the figure measures the quantizer, not a
kernel), then scored on the fixed slice (WikiText-2 test, first 16 x 512 tokens). Calibrated
rows weight each layer's error by the mean squared input activations measured on 16 x 512
tokens of Tiny Shakespeare (never the evaluation text). HQQ comes from the `bench` extra; if it
cannot be imported its rows are skipped.

Run: .venv/bin/python benchmarks/bench_fit_perplexity.py [bits ...]   (default: 4 3 2)
(``LOWBIT_BENCH_ONLY=text`` keeps only the rows whose label contains ``text``.)
"""

from __future__ import annotations

import os
import sys
import time

import torch

import lowbit
from lowbit.calibrate import calibration_batches, input_importance
from lowbit.eval import eval_tokens, perplexity
from lowbit.io.hf import load_pretrained
from lowbit.models import smollm2_dir
from lowbit.modules import linear_weight

GROUP = 64


def hqq_restore(bits: int, group: int):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=group)

    def run(w, _importance):
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w.clone()
        layer = HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
        return layer.dequantize().float(), bits + 32 / group  # fp16 scale + fp16 zero per group

    return run


def ours(spec: lowbit.QuantSpec):
    def run(w, importance):
        qt = lowbit.quantize(w, spec, importance=importance)
        return qt.dequantize(), qt.bits_per_weight

    return run


def methods(bits: int) -> dict:
    table = {f"HQQ package {bits}-bit g{GROUP}": (hqq_restore, False)}
    for fit in ("minmax", "mse", "hqq"):
        for zero in ("int", "float"):
            spec = lowbit.QuantSpec(
                bits=bits,
                group_size=GROUP,
                fit=None if fit == "minmax" else fit,
                zero_point=zero,
            )
            table[f"lowbit {spec.label}"] = (lambda s=spec: ours(s), False)
    for zero in ("int", "float"):
        spec = lowbit.QuantSpec(bits=bits, group_size=GROUP, fit="mse", zero_point=zero)
        table[f"lowbit {spec.label} + calibration"] = (lambda s=spec: ours(s), True)
    return table


def linear_layers(model, skip: str | None = "lm_head"):
    """({name: Linear layer}, {name: a copy of its weight}) of ``model``, but ``skip``."""
    layers = {
        name: module
        for name, module in model.named_modules()
        if linear_weight(module) is not None and (skip is None or skip not in name)
    }
    return layers, {name: m.weight.detach().clone() for name, m in layers.items()}


@torch.no_grad()
def swap_in(layers, originals, run, importance=None) -> tuple[list[float], float]:
    """Replace every layer's weight by ``run(original, importance.get(name))``'s restored
    weight; returns (relative error per layer, total stored bits)."""
    errors, bits_total = [], 0.0
    for name, module in layers.items():
        w = originals[name]
        w_hat, bpw = run(w, None if importance is None else importance.get(name))
        module.weight.copy_(w_hat.to(w.dtype))
        bits_total += bpw * w.numel()
        errors.append(((w - w_hat).norm() / w.norm()).item())
    return errors, bits_total


@torch.no_grad()
def restore(layers, originals) -> None:
    """Put the original weights back."""
    for name, module in layers.items():
        module.weight.copy_(originals[name])


def main() -> None:
    bits_list = [int(b) for b in sys.argv[1:]] or [4, 3, 2]
    model, tokenizer = load_pretrained(smollm2_dir())
    model.eval()
    tokens = eval_tokens(tokenizer)
    layers, originals = linear_layers(model)
    importance = input_importance(model, calibration_batches(tokenizer, 16), layers=list(layers))
    base = perplexity(model, tokens).perplexity
    print(f"fp32 perplexity {base:.3f} (WikiText-2 test, 16 x 512 tokens)\n")
    for bits in bits_list:
        print(f"### {bits} bits, group {GROUP}\n")
        print("| method | bits/weight | perplexity | Δppl | mean rel. error | quantize s |")
        print("| --- | --- | --- | --- | --- | --- |")
        for label, (make, calibrated) in methods(bits).items():
            if os.environ.get("LOWBIT_BENCH_ONLY", "") not in label:
                continue
            try:
                run = make(bits, GROUP) if make is hqq_restore else make()
            except ImportError as err:
                print(f"| {label} | skipped: {err} | | | | |")
                continue
            start = time.perf_counter()
            errors, bits_total = swap_in(layers, originals, run, importance if calibrated else None)
            seconds = time.perf_counter() - start
            ppl = perplexity(model, tokens).perplexity
            bpw = bits_total / sum(w.numel() for w in originals.values())
            print(
                f"| {label} | {bpw:.3f} | {ppl:.3f} | {ppl - base:+.3f} | "
                f"{sum(errors) / len(errors):.4f} | {seconds:.1f} |"
            )
            sys.stdout.flush()
        restore(layers, originals)
        print()


if __name__ == "__main__":
    main()
