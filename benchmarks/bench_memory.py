"""Resident memory of a loaded quantized model against its directory's size (issue 15's target:
at most 1.15x for the int4 demo model).

Run: .venv/bin/python benchmarks/bench_memory.py runs/int4-g64 [more directories]
(one process per directory: each figure is the resident set after `load_quantized` (without the
tokenizer) and after one 7-token forward, minus the resident set after the imports, including
the model class's modules and lowbit's native library: one-time costs, not the model's).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def resident_bytes() -> int:
    """This process's resident set (VmRSS) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(directory: str) -> str:
    import transformers
    from accelerate import init_empty_weights

    from lowbit import native
    from lowbit.io.hf import load_config, load_quantized

    # One-time costs that are not the model: the model class's modules (transformers imports
    # them on the first from_config, ~100 MiB here) and lowbit's native library.
    config = load_config(directory)
    with init_empty_weights(include_buffers=False):
        transformers.AutoModelForCausalLM.from_config(config)
    native.available()
    base = resident_bytes()
    model, _ = load_quantized(directory, tokenizer=False)
    loaded = resident_bytes()
    with torch.inference_mode():
        model(torch.tensor([[504, 2365, 282, 260, 2269, 5060, 2079]]))  # 7 tokens
    used = resident_bytes()
    size = sum(
        os.path.getsize(os.path.join(directory, f))
        for f in os.listdir(directory)
        if os.path.isfile(os.path.join(directory, f))
    )
    mib = 2**20
    return (
        f"| {directory} | {size / mib:.1f} | {(loaded - base) / mib:.1f} | "
        f"{(used - base) / mib:.1f} | {(used - base) / size:.2f}x |"
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(measure(sys.argv[2]))
        return
    print("| directory | size MiB | after load MiB | after one forward MiB | vs size |")
    print("| --- | --- | --- | --- | --- |")
    for directory in sys.argv[1:]:
        done = subprocess.run(
            [sys.executable, __file__, "--one", directory], capture_output=True, text=True
        )
        print(done.stdout.strip() or f"| {directory} | failed: {done.stderr.strip()[-200:]} |")


if __name__ == "__main__":
    main()
