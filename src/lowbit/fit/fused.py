"""A fused, compiled scorer for the uniform integer grid (the searching fits' hot loop).

Scoring ``C`` candidates of ``B`` blocks of ``n`` weights is ``B * C * n`` multiply-add, round,
clamp, subtract and square steps. In eager PyTorch each step is a pass over memory; compiled by
TorchInductor into one loop it runs about 10x faster on a CPU (measured in
``benchmarks/bench_fits.py``). Compilation needs a C++ compiler and takes seconds per new shape,
so it is used only for large searches and falls back to the eager loop for good when it fails.
Set ``LOWBIT_COMPILE=0`` to never compile.
"""

from __future__ import annotations

import os
import warnings

import torch

# Below this many element-candidates (B * C * n) the eager loop is done before a compile is.
MIN_WORK = 1 << 24
# Blocks per compiled call: shapes are static (fast code), the last chunk is padded.
_CHUNK_ELEMENTS = 1 << 16

_compiled: dict[bool, object] = {}
_broken = False


def _scores(x, w, inv, zero, qmin: float, qmax: float):
    u = torch.addcmul(zero.unsqueeze(-1), x.unsqueeze(1), inv.unsqueeze(-1))
    d = u - u.round().clamp(qmin, qmax)
    d = d * d
    if w is not None:
        d = d * w.unsqueeze(1)
    return d.sum(-1)


def enabled(device: torch.device) -> bool:
    """Whether the compiled scorer may be tried on ``device`` (CPU only; not disabled)."""
    return not _broken and device.type == "cpu" and os.environ.get("LOWBIT_COMPILE", "1") != "0"


def uniform_scores(
    x: torch.Tensor,
    w: torch.Tensor | None,
    inv: torch.Tensor,
    zero: torch.Tensor,
    qmin: float,
    qmax: float,
) -> torch.Tensor | None:
    """``sum(w * (u - clamp(round(u)))**2)`` with ``u = x * inv + zero`` per block and candidate.

    ``x``/``w``: float32 ``[B, n]``; ``inv``/``zero``: float32 ``[B, C]``. Returns float32
    ``[B, C]``, or ``None`` if compiling is unavailable (the caller scores eagerly).
    """
    global _broken
    weighted = w is not None
    fn = _compiled.get(weighted)
    if fn is None:
        fn = _compiled[weighted] = torch.compile(_scores, dynamic=False)
    num_blocks, n = x.shape
    step = max(1, _CHUNK_ELEMENTS // n)
    out = torch.empty_like(inv)
    try:
        for b0 in range(0, num_blocks, step):
            b1 = min(num_blocks, b0 + step)
            args = [x[b0:b1], None if w is None else w[b0:b1], inv[b0:b1], zero[b0:b1]]
            if b1 - b0 < step:  # pad: one static shape, one compiled kernel
                args = [None if a is None else _pad(a, step) for a in args]
            out[b0:b1] = fn(*args, qmin, qmax)[: b1 - b0]
    except Exception as err:  # no compiler, unsupported platform: eager from now on
        _broken = True
        warnings.warn(
            f"lowbit: compiled scoring unavailable ({type(err).__name__}: {err}); "
            "using the eager loop",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return out


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    padded = t.new_zeros((rows, *t.shape[1:]))
    padded[: t.shape[0]] = t
    return padded
