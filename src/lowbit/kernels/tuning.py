"""Measure the dispatch table (`lowbit.kernels.dispatch`): every path, per format, input dtype
and token count, timed on this machine (``lowbit tune``; ``benchmarks/bench_dispatch.py``).

Each format is quantized once (a 4096 x 4096 Gaussian weight), each path runs the same input,
and the median of several calls after a warm-up is kept. A path more than `GIVE_UP` times
slower than the fastest whose time grows with the tokens is not measured at larger counts (it
is ranked last there), so the table takes a few minutes on two cores.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowbit import native
from lowbit.kernels.dispatch import DEQUANTIZE, DEQUANTIZE_FP32, TABLE_VERSION, format_key
from lowbit.kernels.registry import available_kernels, get_kernel
from lowbit.quantize import quantize
from lowbit.spec import QuantSpec
from lowbit.tensor import QuantizedTensor

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DTYPES = (torch.float32, torch.bfloat16)
SHAPE = (4096, 4096)  # the common LLM projection size; crossovers move with it
GIVE_UP = 4.0
HYSTERESIS = 0.1
# One representative spec per format key (group 64 where groups apply).
FORMATS = {
    "int2": QuantSpec(bits=2, group_size=64),
    "int3": QuantSpec(bits=3, group_size=64),
    "int4": QuantSpec(bits=4, group_size=64),
    "int8": QuantSpec(bits=8, granularity="channel"),
    "codebook2": QuantSpec(bits=2, grid="gaussian", group_size=64),
    "codebook3": QuantSpec(bits=3, grid="gaussian", group_size=64),
    "codebook4": QuantSpec(bits=4, grid="nf4", group_size=64),
}


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up: kernel layouts, workspaces, first-touch pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _paths(qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, Callable]:
    """Every path that can compute ``x @ W.T`` for ``qt`` on CPU: name -> f(x)."""
    device = torch.device("cpu")
    paths: dict[str, Callable] = {}
    for name in available_kernels():
        kernel = get_kernel(name)
        if kernel.supports(qt, device):
            prepared = kernel.prepare(qt)
            paths[name] = lambda x, k=kernel, p=prepared: k.run(x, p, None)

    buffers = {}  # one reused weight buffer per compute dtype, as QuantLinear's workspace

    def dequantize(x, compute=dtype):
        if compute not in buffers:
            buffers[compute] = torch.empty(qt.shape, dtype=compute)
        out = buffers[compute]
        weight = qt.dequantize(compute, out=out, rotated=True)
        return F.linear(x.to(compute), weight).to(x.dtype)

    paths[DEQUANTIZE] = dequantize
    if dtype != torch.float32:
        paths[DEQUANTIZE_FP32] = lambda x: dequantize(x, torch.float32)
    return paths


def measure(
    formats: dict[str, QuantSpec] | None = None,
    tokens: tuple[int, ...] = TOKENS,
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    shape: tuple[int, int] = SHAPE,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time every path; return the table (`lowbit.kernels.dispatch` reads its ``rankings``).

    Raises:
        ValueError / TypeError: empty or non-QuantSpec ``formats``, ``tokens`` not ascending
            positive ints, ``shape`` not two positive ints, ``repeats`` below 1, or a spec whose
            format key is not its key.

    Returns a dict with ``version``, ``device``, ``machine``, ``torch``, ``threads``, ``shape``,
    ``tokens``, ``rankings`` (dtype name -> format key -> per token count, path names fastest
    first) and ``timings_ms`` (same keys -> per token count, path -> median ms).
    """
    formats = FORMATS if formats is None else formats
    if not isinstance(formats, dict) or not formats:
        raise ValueError("formats must be a non-empty dict of format key -> QuantSpec")
    if not all(isinstance(spec, QuantSpec) for spec in formats.values()):
        raise TypeError("formats must map format keys to QuantSpec objects")
    counts = list(tokens)
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                             for n in counts) or counts != sorted(set(counts)):
        raise ValueError(f"tokens must be ascending positive ints, got {tokens!r}")
    if len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"shape must be two positive ints (out, in), got {shape!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=gen) * 0.02
    rankings: dict[str, dict] = {}
    timings: dict[str, dict] = {}
    for key, spec in formats.items():
        qt = quantize(weight, spec)
        if format_key(qt) != key:
            raise ValueError(f"format {key!r}: spec {spec.label} has key {format_key(qt)!r}")
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            paths = _paths(qt, dtype)
            dropped: set[str] = set()
            last: dict[str, float] = {}
            last_count = 1
            per_tokens_rank, per_tokens_ms = [], []
            for count in tokens:
                x = torch.randn(count, shape[1], generator=gen).to(dtype)
                # Large batches take long and vary less: fewer repeats there.
                n = repeats if count <= 64 else max(2, repeats // 2)
                ms = {p: _median_ms(lambda f=f, x=x: f(x), n) for p, f in paths.items()
                      if p not in dropped}
                best = min(ms.values())
                # A path far behind whose time grows with the tokens (a small-batch kernel)
                # stays behind; one with a fixed cost first (dequantize, tiles) catches up, so
                # it is measured on.
                for path, spent in ms.items():
                    before = last.get(path)
                    if before is None or spent <= GIVE_UP * best:
                        continue
                    if spent >= 0.75 * before * count / last_count:  # grows with the tokens
                        dropped.add(path)
                last, last_count = ms, count
                order = sorted(ms, key=ms.get) + sorted(set(paths) - set(ms))
                previous = per_tokens_rank[-1][0] if per_tokens_rank else None
                if previous in ms and ms[previous] <= (1 + HYSTERESIS) * best:
                    # Within noise of the fastest: keep the smaller batch's winner, so that
                    # timing noise does not make a layer switch paths back and forth.
                    order.remove(previous)
                    order.insert(0, previous)
                per_tokens_rank.append(order)
                per_tokens_ms.append({p: round(t, 4) for p, t in ms.items()})
                if progress is not None:
                    progress(f"{name} {key} {count} tokens: {order[0]} {best:.3f} ms")
            rankings.setdefault(name, {})[key] = per_tokens_rank
            timings.setdefault(name, {})[key] = per_tokens_ms
    return {
        "version": TABLE_VERSION,
        "device": "cpu",
        "machine": native.cpu_info("model name"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": list(shape),
        "tokens": list(tokens),
        "rankings": rankings,
        "timings_ms": timings,
    }
