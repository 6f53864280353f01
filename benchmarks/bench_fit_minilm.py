"""End to end on all-MiniLM-L6-v2: embedding cosine similarity to fp32 per fit, against HQQ.

The SmolLM2 checkpoint was stored as Q4_1, which favours some formats; this encoder is a
native fp32 model. Every Linear weight is replaced by its quantize-dequantize (so the figure
measures the quantizer), then 64 WikiText-2 test paragraphs are embedded (mean pooling, L2
normalised) and compared with the fp32 embeddings. Calibrated rows weight errors by the mean
squared input activations on 16 x 128 tokens of Tiny Shakespeare.

Run: .venv/bin/python benchmarks/bench_fit_minilm.py [bits ...]   (default: 4 3)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from bench_fit_perplexity import hqq_restore, linear_layers, ours, restore, swap_in  # noqa: E402
from test_e2e_minilm import embed, sentences  # noqa: E402

import lowbit  # noqa: E402
from lowbit.calibrate import calibration_batches, input_importance  # noqa: E402
from lowbit.io.hf import load_pretrained  # noqa: E402
from lowbit.models import minilm_dir  # noqa: E402

GROUP = 64


def rows(bits: int) -> dict:
    table = {f"HQQ package {bits}-bit g{GROUP}": (None, False)}
    for fit in ("minmax", "mse", "hqq"):
        for zero in ("int", "float"):
            spec = lowbit.QuantSpec(
                bits=bits, group_size=GROUP, fit=None if fit == "minmax" else fit, zero_point=zero
            )
            table[f"lowbit {spec.label}"] = (spec, False)
    for zero in ("int", "float"):
        spec = lowbit.QuantSpec(bits=bits, group_size=GROUP, fit="mse", zero_point=zero)
        table[f"lowbit {spec.label} + calibration"] = (spec, True)
    return table


def main() -> None:
    bits_list = [int(b) for b in sys.argv[1:]] or [4, 3]
    model, tokenizer = load_pretrained(minilm_dir())
    model.eval()
    texts = sentences(64)
    reference = embed(model, tokenizer, texts)
    layers, originals = linear_layers(model, skip=None)
    batches = calibration_batches(tokenizer, 16, 128)
    importance = input_importance(model, batches, layers=list(layers))
    for bits in bits_list:
        print(f"\n### {bits} bits, group {GROUP}\n")
        print("| method | mean cosine to fp32 | min cosine | mean rel. error |")
        print("| --- | --- | --- | --- |")
        for label, (spec, calibrated) in rows(bits).items():
            try:
                run = hqq_restore(bits, GROUP) if spec is None else ours(spec)
            except ImportError as err:
                print(f"| {label} | skipped: {err} | | |")
                continue
            errors, _ = swap_in(layers, originals, run, importance if calibrated else None)
            cosine = (reference * embed(model, tokenizer, texts)).sum(-1)
            print(
                f"| {label} | {cosine.mean():.5f} | {cosine.min():.5f} | "
                f"{sum(errors) / len(errors):.4f} |"
            )
            sys.stdout.flush()
        restore(layers, originals)


if __name__ == "__main__":
    main()
