"""Fused, compiled scorers for the uniform integer grid (the searching fits' hot loop).

Scoring ``C`` candidates of ``B`` blocks of ``n`` weights is ``B * C * n`` multiply-add, round,
clamp, subtract and square steps. In eager PyTorch each step is a pass over memory; compiled by
TorchInductor into one loop it runs several times faster on a CPU (``benchmarks/bench_fits.py``).
Compilation needs a C++ compiler and takes seconds per new shape, so it is used only for large
searches, and the caller falls back to the eager loop for good when it fails. Set
``LOWBIT_COMPILE=0`` to never compile.

Two variants: many candidates (a search) run in fixed chunks of blocks, padded, so that every
shape is static and the inner loops are fully specialised; few candidates (rescoring a winner)
run on the whole chunk with the block count marked dynamic, so one kernel serves every size.
"""

from __future__ import annotations

import os
import warnings

import torch

from lowbit.fit.candidates import candidate_params
from lowbit.storage import stored_params

# Below this many element-candidates (B * max(C, 16) * n) the eager loop wins over compiling.
MIN_WORK = 1 << 22
# Element-candidates per call of the static (search) variant.
_STATIC_WORK = 1 << 23
# Up to this many candidates the dynamic (rescoring) variant is used.
_FEW = 4

_compiled: dict[tuple[str, bool], object] = {}
_broken = False


def _best(x, w, inv, zero, qmin: float, qmax: float):
    u = torch.addcmul(zero.unsqueeze(-1), x.unsqueeze(1), inv.unsqueeze(-1))
    d = u - u.round().clamp(qmin, qmax)
    d = d * d
    if w is not None:
        d = d * w.unsqueeze(1)
    # Back to value units: the normalised error times scale**2 (1 / inv**2).
    safe = torch.where(inv > 0, inv, torch.ones_like(inv))
    errors = d.sum(-1) / (safe * safe)
    return errors.min(dim=-1)


def _range_params(
    low,
    width,
    ratio,
    position,
    vmin: float,
    vmax: float,
    center: float,
    symmetric: bool,
    zero_point: str,
    scale_dtype: torch.dtype,
):
    # A kernel of its own: fused into the scoring loop, inductor would redo this division for
    # every weight instead of once per candidate. Candidates are rounded as they will be
    # stored, so the winner is the best one as stored.
    scale, zero = candidate_params(
        low, width, ratio, position, vmin, vmax, center, symmetric, zero_point == "int"
    )
    scale, zero, _ = stored_params(
        scale, None if symmetric else zero, vmin, vmax, center, zero_point, scale_dtype
    )
    scale = scale.to(torch.float32)
    return torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0), zero


def _residual_stats(x, w, scale, zero, qmin: float, qmax: float):
    # Same arithmetic as the eager scorers (lowbit.fit.search.nearest_values), per candidate.
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)
    u = torch.addcmul(zero.unsqueeze(-1), x.unsqueeze(1), inv.unsqueeze(-1))
    v = u.round().clamp(qmin, qmax)
    r = x.unsqueeze(1) - (v - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    squared = r * r
    if w is not None:
        squared = squared * w.unsqueeze(1)
    return r.amin(-1), r.amax(-1), squared.sum(-1)


def enabled(device: torch.device) -> bool:
    """Whether the compiled scorers may be tried on ``device`` (CPU only; not disabled)."""
    return not _broken and device.type == "cpu" and os.environ.get("LOWBIT_COMPILE", "1") != "0"


def should_compile(grid, device: torch.device, work: int) -> bool:
    """The one rule for running a search compiled: the uniform grid (the kernels compute codes
    as values), at least `MIN_WORK` weight-candidate evaluations (below, compiling costs more
    than it saves), and compilation `enabled` on ``device``."""
    return grid.codes_are_values and work >= MIN_WORK and enabled(device)


def _kernel(kind, weighted: bool):
    key = (kind, weighted)
    if key not in _compiled:
        if callable(kind):
            _compiled[key] = torch.compile(kind, dynamic=False)
        elif kind == "stats":
            _compiled[key] = torch.compile(_residual_stats, dynamic=False)
        elif kind == "params":
            # Inductor otherwise drops float16/bfloat16 round trips, i.e. the storage rounding.
            options = {"emulate_precision_casts": True}
            _compiled[key] = torch.compile(_range_params, dynamic=False, options=options)
        else:
            _compiled[key] = torch.compile(_best, dynamic=False)
    return _compiled[key]


def uniform_best(
    x: torch.Tensor,
    w: torch.Tensor | None,
    inv: torch.Tensor,
    zero: torch.Tensor,
    qmin: float,
    qmax: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Least ``sum(w * (x - x_hat)**2)`` over candidates and its index, per block.

    ``x_hat = (clamp(round(u), qmin, qmax) - zero) / inv`` with ``u = x * inv + zero``; ``x``/``w``
    float32 ``[B, n]``, ``inv``/``zero`` float32 ``[B, C]`` (``inv = 0`` is an all-zero block,
    error 0). Returns (float32 ``[B]``, int64 ``[B]``; the first index on ties), or ``None`` if
    compiling is unavailable (the caller scores eagerly).
    """
    num_blocks, n = x.shape
    count = inv.shape[1]
    errors = torch.empty(num_blocks, dtype=torch.float32, device=x.device)
    index = torch.empty(num_blocks, dtype=torch.int64, device=x.device)
    try:
        if count <= _FEW:
            fn = _kernel("few", w is not None)
            args = [x, w, inv, zero]
            for a in args:
                if a is not None:
                    torch._dynamo.mark_dynamic(a, 0)
            errors[:], index[:] = fn(*args, qmin, qmax)
            return errors, index
        fn = _kernel("many", w is not None)
        step = max(1, _STATIC_WORK // (n * count))
        for b0, b1, args in _chunks(num_blocks, step, [x, w, inv, zero]):
            e, i = fn(*args, qmin, qmax)
            errors[b0:b1], index[b0:b1] = e[: b1 - b0], i[: b1 - b0]
    except Exception as err:
        _give_up(err)
        return None
    return errors, index


def range_best(
    x: torch.Tensor,
    w: torch.Tensor | None,
    low: torch.Tensor,
    width: torch.Tensor,
    ratio: torch.Tensor,
    position: torch.Tensor,
    vmin: float,
    vmax: float,
    center: float,
    symmetric: bool,
    zero_point: str,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`uniform_best` over the windows of `lowbit.fit.candidates.candidate_params`, computed
    inside the kernel and rounded as stored (`lowbit.storage.stored_params`): ``low``/``width``
    float32 ``[B, 1]``, ``ratio``/``position`` ``[C]``.
    Returns (least error ``[B]``, its index ``[B]``) or ``None`` if compiling is unavailable."""
    num_blocks, n = x.shape
    errors = torch.empty(num_blocks, dtype=torch.float32, device=x.device)
    index = torch.empty(num_blocks, dtype=torch.int64, device=x.device)
    fn = _kernel("many", w is not None)
    params = _kernel("params", False)
    step = max(1, _STATIC_WORK // (n * len(ratio)))
    flags = (vmin, vmax, center, symmetric, zero_point, scale_dtype)
    try:
        for b0, b1, (xs, ws, lows, widths) in _chunks(num_blocks, step, [x, w, low, width]):
            inv, zero = params(lows, widths, ratio, position, *flags)
            e, i = fn(xs, ws, inv, zero, vmin, vmax)
            errors[b0:b1], index[b0:b1] = e[: b1 - b0], i[: b1 - b0]
    except Exception as err:
        _give_up(err)
        return None
    return errors, index


def residual_stats(
    x: torch.Tensor,
    w: torch.Tensor | None,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmin: float,
    qmax: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Per block and candidate, the residual ``r = x - (clamp(round(x / s + z)) - z) * s``'s
    (min, max, ``sum(w * r**2)``), float32 ``[B, C]`` each, for ``x``/``w`` float32 ``[B, n]``
    and ``scale``/``zero [B, C]``. ``None`` if compiling is unavailable."""
    num_blocks, n = x.shape
    out = [torch.empty_like(scale) for _ in range(3)]
    step = max(1, _STATIC_WORK // (n * scale.shape[1]))
    try:
        fn = _kernel("stats", w is not None)
        for b0, b1, args in _chunks(num_blocks, step, [x, w, scale, zero]):
            for dest, got in zip(out, fn(*args, qmin, qmax), strict=True):
                dest[b0:b1] = got[: b1 - b0]
    except Exception as err:
        _give_up(err)
        return None
    return tuple(out)


def per_block(fn, x, w, rows, scale, zero, shared: list, constants: tuple):
    """``fn(x[rows], w[rows], scale, zero, *shared, *constants)`` compiled, in chunks of
    ``rows`` (int64 ``[P]``, blocks of ``x [B, n]`` to score; ``w`` the same shape or ``None``;
    ``scale``/``zero [P, 1]``; ``shared`` 0-d tensors), gathering each chunk only when it is
    scored -> float32 ``[P]``. ``None`` if compiling is unavailable."""
    count, n = rows.shape[0], x.shape[1]
    out = torch.empty(count, dtype=torch.float32, device=x.device)
    step = max(1, _STATIC_WORK // max(1, n))
    for b0 in range(0, count, step):
        index = rows[b0 : b0 + step]
        tensors = [x[index], None if w is None else w[index]]
        tensors += [scale[b0 : b0 + step], zero[b0 : b0 + step], *shared]
        got = run_dynamic(fn, tensors, constants)
        if got is None:
            return None
        out[b0 : b0 + step] = got
    return out


def run_dynamic(fn, tensors: list, constants: tuple):
    """``fn(*tensors, *constants)`` compiled, the leading (block) dimension of every tensor
    (but 0-d ones) dynamic, so that one kernel serves every chunk size. Returns
    ``fn``'s result, or ``None`` if compiling is unavailable (the caller runs ``fn`` eagerly)."""
    try:
        kernel = _kernel(fn, any(t is None for t in tensors))
        for t in tensors:
            if t is not None and t.dim() and t.shape[0] > 1:
                torch._dynamo.mark_dynamic(t, 0)
        return kernel(*tensors, *constants)
    except Exception as err:
        _give_up(err)
        return None


def _give_up(err: Exception) -> None:
    """No compiler, an unsupported platform: warn once and score eagerly from now on."""
    global _broken
    _broken = True
    warnings.warn(
        f"lowbit: compiled scoring unavailable ({type(err).__name__}: {err}); using the eager loop",
        RuntimeWarning,
        stacklevel=3,
    )


def _chunks(num_blocks: int, step: int, tensors: list):
    """(start, stop, tensors sliced to [start:stop] and zero-padded to ``step`` rows)."""
    for b0 in range(0, num_blocks, step):
        b1 = min(num_blocks, b0 + step)
        sliced = [None if t is None else t[b0:b1] for t in tensors]
        if b1 - b0 < step:  # pad: one static shape, one compiled kernel
            sliced = [None if t is None else _pad(t, step) for t in sliced]
        yield b0, b1, sliced


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    padded = t.new_zeros((rows, *t.shape[1:]))
    padded[: t.shape[0]] = t
    return padded
