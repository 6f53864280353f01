"""Which path computes a batch: a kernel, or dequantize + ``F.linear``, by measured crossover.

The timings live in a table written by `lowbit.kernels.tuning` (``lowbit tune``): for each input
dtype, format (``int4``, ``codebook4``, ... see `format_key`) and token count measured, the paths
ranked fastest first. The package ships the table measured on its development machine
(``lowbit/data/dispatch_cpu.json``); ``lowbit tune`` writes this machine's into the cache
directory, where it takes precedence. A batch of ``n`` tokens uses the ranking of the smallest
measured count ``>= n`` (the largest for bigger batches), and within it the first path this
layer can run: the kernel must support the format on the device, and a kernel that computes in
bfloat16 serves float32 inputs only when the layer allows it (``allow_bf16``). Formats the table
does not cover fall back to the registry's order (``priority``, then ``max_tokens``).

Paths besides kernel names: `DEQUANTIZE` (restore the weight in the input's dtype, then
``F.linear``) and `DEQUANTIZE_FP32` (restore and multiply in float32, cast back: on CPUs without
bfloat16 matrix instructions, much faster for bfloat16 and float16 inputs than their own GEMM).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.grids import get_grid
from lowbit.kernels import registry
from lowbit.kernels.registry import DEQUANTIZE, Kernel, available_kernels, get_kernel
from lowbit.tensor import QuantizedTensor

DEQUANTIZE_FP32 = "dequantize_fp32"
TABLE_VERSION = 1
_SHIPPED = Path(__file__).resolve().parent.parent / "data"
_tables: dict[str, dict | None] = {}


@dataclass(frozen=True)
class Plan:
    """A layer's paths by batch size: ``steps`` are ``(max_tokens, path)`` in increasing order,
    the last with ``max_tokens=None`` (every larger batch)."""

    steps: tuple[tuple[int | None, str], ...]

    def path(self, tokens: int) -> str:
        """The path a batch of ``tokens`` rows takes."""
        for limit, name in self.steps:
            if limit is None or tokens <= limit:
                return name
        return self.steps[-1][1]

    def summary(self) -> str:
        """``"cpu_native:1-4,dequantize:5+"``: each path with the token counts it serves (one
        word, so tables can show it in a column); just the path when one serves every size."""
        parts, low = [], 1
        for limit, name in self.steps:
            span = f"{low}+" if limit is None else (f"{low}" if limit == low else f"{low}-{limit}")
            parts.append(f"{name}:{span}")
            low = (limit or 0) + 1
        return parts[0].split(":")[0] if len(parts) == 1 else ",".join(parts)


def format_key(qt: QuantizedTensor) -> str:
    """The table's name for ``qt``'s format: ``int<bits>`` for the int grid, ``codebook<bits>``
    for grids whose codes index a table of values (kernels' speed depends on little else)."""
    kind = "int" if get_grid(qt.spec.grid).codes_are_values else "codebook"
    return f"{kind}{qt.spec.bits}"


def table_path(device_type: str = "cpu") -> Path:
    """Where ``lowbit tune`` writes this machine's table (the cache directory)."""
    from lowbit.models import cache_dir

    return cache_dir() / f"dispatch_{device_type}.json"


def load_table(device_type: str = "cpu") -> dict | None:
    """This machine's table if ``lowbit tune`` wrote one, else the shipped one, else None
    (``LOWBIT_DISPATCH_TABLE=PATH`` names another file). Read once per process; a file that
    does not parse as a valid version-1 table is skipped for the next one."""
    if device_type not in _tables:
        candidates = [os.environ.get("LOWBIT_DISPATCH_TABLE")]
        candidates += [table_path(device_type), _SHIPPED / f"dispatch_{device_type}.json"]
        _tables[device_type] = None
        for candidate in candidates:
            if candidate and Path(candidate).is_file():
                try:
                    data = json.loads(Path(candidate).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if _valid(data):
                    _tables[device_type] = data
                    break
    return _tables[device_type]


def _valid(data: object) -> bool:
    """Whether ``data`` is a version-1 table: ascending positive ``tokens``, and per dtype and
    format one list of path names per token count."""
    if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
        return False
    tokens, rankings = data.get("tokens"), data.get("rankings")
    if not isinstance(tokens, list) or not tokens or not isinstance(rankings, dict):
        return False
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in tokens):
        return False
    if tokens != sorted(set(tokens)):
        return False
    for per_format in rankings.values():
        if not isinstance(per_format, dict):
            return False
        for per_tokens in per_format.values():
            if not isinstance(per_tokens, list) or len(per_tokens) != len(tokens):
                return False
            for names in per_tokens:
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    return False
    return True


def forget_tables() -> None:
    """Drop the tables read so far (after ``lowbit tune`` wrote a new one); layers plan again."""
    _tables.clear()
    registry.note_change()


def allowed(
    kernel: Kernel, qt: QuantizedTensor, device: torch.device, dtype: torch.dtype, allow_bf16: bool
) -> bool:
    """Whether ``kernel`` may run ``qt`` for ``dtype`` inputs on ``device``: a kernel that
    computes in bfloat16 serves only bfloat16 inputs, unless ``allow_bf16`` (float16 and
    float64 inputs would lose precision in it as float32 ones do)."""
    if dtype != torch.bfloat16 and not (kernel.fp32_exact or allow_bf16):
        return False
    return kernel.max_tokens > 0 and kernel.supports(qt, device)


def plan_for(
    qt: QuantizedTensor,
    device: torch.device,
    dtype: torch.dtype,
    *,
    allow_bf16: bool = False,
    kernel: str = "auto",
) -> Plan:
    """The `Plan` of a layer holding ``qt`` for ``dtype`` inputs on ``device``.

    ``kernel`` is `QuantLinear.kernel`: ``"auto"`` (by the table), ``"dequantize"`` (always),
    or a kernel name (that kernel up to its ``max_tokens``, whatever the dtype: the user chose).
    """
    device = torch.device(device)
    if kernel == DEQUANTIZE:
        return Plan(((None, DEQUANTIZE),))
    if kernel != "auto":
        return Plan(((get_kernel(kernel).max_tokens, kernel), (None, DEQUANTIZE)))
    kernels = [get_kernel(name) for name in available_kernels()]  # highest priority first
    usable = {k.name for k in kernels if allowed(k, qt, device, dtype, allow_bf16)}
    ranked = _ranking(device.type, dtype, format_key(qt))
    if ranked is None:
        for candidate in kernels:
            if candidate.name in usable:
                return Plan(((candidate.max_tokens, candidate.name), (None, DEQUANTIZE)))
        return Plan(((None, DEQUANTIZE),))
    steps: list[tuple[int | None, str]] = []
    # A kernel registered after the table was measured is not in it: when it outranks every
    # measured kernel that could serve, it serves up to its max_tokens (its author's claim).
    measured = {name for _, names in ranked for name in names}
    newer = [k for k in kernels if k.name in usable and k.name not in measured]
    best_measured = max((k.priority for k in kernels if k.name in usable & measured), default=None)
    if newer and (best_measured is None or newer[0].priority > best_measured):
        steps.append((newer[0].max_tokens, newer[0].name))
        # Larger batches: the table's rows above its range (the last row for any size).
        ranked = [row for row in ranked if row[0] > newer[0].max_tokens] or ranked[-1:]
    for index, (tokens, names) in enumerate(ranked):
        choice = DEQUANTIZE
        for name in names:
            if name in usable or name == DEQUANTIZE:
                choice = name
                break
            if name == DEQUANTIZE_FP32 and dtype != torch.float32:
                choice = name
                break
        limit = None if index == len(ranked) - 1 else tokens
        if steps and steps[-1][1] == choice:
            steps[-1] = (limit, choice)
        elif not steps or limit is None or limit > steps[-1][0]:
            steps.append((limit, choice))
    return Plan(tuple(steps))


def _ranking(device_type: str, dtype: torch.dtype, key: str) -> list | None:
    data = load_table(device_type)
    if data is None:
        return None
    by_dtype = data.get("rankings", {})
    name = str(dtype).removeprefix("torch.")
    per_format = by_dtype.get(name) or (by_dtype.get("bfloat16") if name == "float16" else None)
    if not isinstance(per_format, dict) or key not in per_format:
        return None
    return list(zip(data["tokens"], per_format[key], strict=True))
