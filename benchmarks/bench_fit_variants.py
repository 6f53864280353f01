"""Data-free fit variants on SmolLM2-135M: WikiText-2 perplexity of option sweeps of ``mse``
and ``hqq`` (int4/int3 g64), and of weighting each layer's error by the RMSNorm gain in front
of it (a data-free stand-in for activation statistics: q/k/v by ``input_layernorm``,
gate/up by ``post_attention_layernorm``; other layers unweighted).

Same method as ``bench_fit_perplexity.py`` (quantize-dequantize every Linear weight but the
tied lm_head in the fp32 model, fixed slice of 16 x 512 tokens). One thread, so it can run
beside other work.

Run: .venv/bin/python benchmarks/bench_fit_variants.py BITS [LABEL-SUBSTRING ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_fit_perplexity import linear_layers, ours, swap_in  # noqa: E402

import lowbit  # noqa: E402
from lowbit.eval import eval_tokens, perplexity  # noqa: E402
from lowbit.io.hf import load_pretrained  # noqa: E402
from lowbit.models import smollm2_dir  # noqa: E402


def spec(bits, fit, zero, **options):
    return lowbit.QuantSpec(
        bits=bits, group_size=64, fit=fit, zero_point=zero, fit_options=options or None
    )


def variants(bits: int) -> dict:
    """label -> (spec, whether to weight by the norm gain)."""
    return {
        "mse int": (spec(bits, "mse", "int"), False),
        "mse int min_ratio 0.5": (spec(bits, "mse", "int", min_ratio=0.5), False),
        "mse int min_ratio 0.8": (spec(bits, "mse", "int", min_ratio=0.8), False),
        "mse int min_ratio 0.9 refits 0": (
            spec(bits, "mse", "int", min_ratio=0.9, refits=0),
            False,
        ),
        "mse int refits 0": (spec(bits, "mse", "int", refits=0), False),
        "mse int offsets 1": (spec(bits, "mse", "int", offsets=1), False),
        "mse int norm gain": (spec(bits, "mse", "int"), True),
        "mse float min_ratio 0.8": (spec(bits, "mse", "float", min_ratio=0.8), False),
        "mse float norm gain": (spec(bits, "mse", "float"), True),
        "hqq int norm gain": (spec(bits, "hqq", "int"), True),
        "hqq float lp_norm 0.6": (spec(bits, "hqq", "float", lp_norm=0.6), False),
        "hqq float lp_norm 0.8": (spec(bits, "hqq", "float", lp_norm=0.8), False),
        "hqq float iterations 40": (spec(bits, "hqq", "float", iterations=40), False),
        "hqq float beta 1": (spec(bits, "hqq", "float", beta=1.0), False),
        "hqq float norm gain": (spec(bits, "hqq", "float"), True),
    }


def norm_gains(model, layers) -> dict[str, torch.Tensor]:
    """Squared RMSNorm gain in front of each attention/MLP input projection, mean 1."""
    gains = {}
    for name in layers:
        block = model.get_submodule(name.rsplit(".", 2)[0])
        if name.endswith(("q_proj", "k_proj", "v_proj")):
            g = block.input_layernorm.weight.detach() ** 2
        elif name.endswith(("gate_proj", "up_proj")):
            g = block.post_attention_layernorm.weight.detach() ** 2
        else:
            continue
        gains[name] = g / g.mean()
    return gains


def main() -> None:
    torch.set_num_threads(1)
    bits, wanted = int(sys.argv[1]), sys.argv[2:]
    model, tokenizer = load_pretrained(smollm2_dir())
    model.eval()
    tokens = eval_tokens(tokenizer)
    layers, originals = linear_layers(model)
    gains = norm_gains(model, layers)
    print(f"| {bits}-bit g64 variant | perplexity | mean rel. error | seconds |")
    print("| --- | --- | --- | --- |")
    for label, (s, weighted) in variants(bits).items():
        if wanted and not any(w in label for w in wanted):
            continue
        start = time.perf_counter()
        errors, _ = swap_in(layers, originals, ours(s), gains if weighted else None)
        ppl = perplexity(model, tokens).perplexity
        seconds = time.perf_counter() - start
        print(f"| {label} | {ppl:.3f} | {sum(errors) / len(errors):.4f} | {seconds:.0f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
