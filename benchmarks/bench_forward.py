"""One 512-token forward of a quantized directory against the float model it came from,
alternating in one process (the fairest end-to-end comparison on a noisy machine).

Run: .venv/bin/python benchmarks/bench_forward.py runs/int4-g64 [more directories]
Prints, per directory, the median of 6 alternating pairs of forwards and their ratio.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def seconds(model, ids) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(ids)
        return time.perf_counter() - start


def main() -> None:
    from transformers import AutoModelForCausalLM

    from lowbit.io.hf import load_quantized
    from lowbit.models import resolve_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32)
    base.eval()
    ids = torch.randint(0, base.config.vocab_size, (1, 512))
    print("| directory | fp32 s | quantized s | ratio |")
    print("| --- | --- | --- | --- |")
    for directory in sys.argv[1:]:
        quantized = load_quantized(directory, tokenizer=False)[0]
        seconds(base, ids), seconds(quantized, ids)  # warm-up: first-touch pages, plans
        pairs = [(seconds(base, ids), seconds(quantized, ids)) for _ in range(6)]
        fp32 = statistics.median(p[0] for p in pairs)
        quant = statistics.median(p[1] for p in pairs)
        print(f"| {directory} | {fp32:.3f} | {quant:.3f} | {quant / fp32:.3f}x |", flush=True)
        del quantized


if __name__ == "__main__":
    main()
