"""Resident memory of a loaded quantized model against its directory's size (issue 15's target:
at most 1.15x for the int4 demo model).

Run: .venv/bin/python benchmarks/bench_memory.py runs/int4-g64 [more directories]
(one process per directory: each figure is the resident set after `load_quantized` and after one
7-token forward, minus the resident set after the imports).
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
    import transformers  # noqa: F401  (imported before the baseline is taken)

    from lowbit.io.hf import load_quantized

    base = resident_bytes()
    model, tokenizer = load_quantized(directory, tokenizer=True)
    loaded = resident_bytes()
    with torch.inference_mode():
        model(tokenizer("The history of the city begins", return_tensors="pt").input_ids)
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
