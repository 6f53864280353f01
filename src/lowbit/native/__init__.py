"""lowbit's native CPU kernels (the ``*.cpp`` files beside this module), built on first use
with the system's C++ compiler against the installed PyTorch and loaded as PyTorch operators
(``torch.ops.lowbit_native``).

Why native: the eager dequantize (unpack, grid lookup, ``(value - zero) * scale``, cast) makes
one pass over memory per step, about 3x a plain copy's time; Inductor did not vectorise the
unpack (``docs/status.md``). One C++ pass per weight runs at 0.65-0.93 of a plain copy's speed
for float32 outputs (``docs/benchmarks.md``).

The library is built once per source, PyTorch version and CPU (``-march=native``) into
``<cache>/native/<key>/`` (the cache directory of `lowbit.models.cache_dir`), written to a
temporary name and renamed, so concurrent processes never load a half-written file. Without a
compiler, or when the build fails, `available` is False (one warning says why) and every caller
keeps the eager path; ``LOWBIT_NATIVE=0`` turns the native path off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowbit.grids import get_grid
from lowbit.models import cache_dir
from lowbit.workspace import scratch

if TYPE_CHECKING:
    from lowbit.tensor import QuantizedTensor

_HERE = Path(__file__).parent
_state: dict[str, object] = {}


def enabled() -> bool:
    """Whether the native path may be used (``LOWBIT_NATIVE`` is not ``0``)."""
    return os.environ.get("LOWBIT_NATIVE", "1") != "0"


def available() -> bool:
    """Whether the native operators are loaded (building them on the first call)."""
    if not enabled():
        return False
    if "ok" not in _state:
        try:
            torch.ops.load_library(str(_build()))
            _register_fakes()
            _state["ok"] = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _state["ok"] = False
            warnings.warn(
                f"lowbit: native CPU kernels unavailable, using the eager PyTorch path "
                f"(about 3x slower dequantize): {error}",
                RuntimeWarning,
                stacklevel=2,
            )
    return bool(_state["ok"])


def _register_fakes() -> None:
    # Shapes of the operators' results without running them: what torch.compile traces with.
    @torch.library.register_fake("lowbit_native::linear")
    def _linear_fake(x, packed, bits, group_len, scale, zero_kind, zero, center, vmin, values,
                     out_features):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("lowbit_native::linear_tiled")
    def _linear_tiled_fake(x, packed, bits, group_len, scale, zero_kind, zero, center, vmin,
                           values, out_features, tile_rows, tile):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("lowbit_native::dequantize_")
    def _dequantize_fake(packed, bits, group_len, scale, zero_kind, zero, center, vmin, values,
                         limit, out):
        return None


def cpu_info(*fields: str) -> str:
    """The value of the first of ``fields`` in ``/proc/cpuinfo`` (e.g. ``"model name"``), or
    the platform's processor name where there is no such file or field."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith(fields):
                    return line.split(":", 1)[-1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_id() -> str:
    # -march=native code is only valid on the CPU that built it: key the cache by its flags.
    return cpu_info("flags", "Features")


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler found (set CXX)")
    return compiler


def _command(compiler: str, sources: list[Path], target: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler,
        "-O3",
        "-march=native",
        "-std=c++20",
        "-shared",
        "-fPIC",
        # at::parallel_for is OpenMP in PyTorch's builds; libgomp.so.1 resolves to torch's copy.
        "-fopenmp",
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in include_paths()),
        *(str(source) for source in sources),
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch_lib}",
        "-o",
        str(target),
    ]


def _build() -> Path:
    """The library's path, compiling it first unless this machine's build is cached."""
    compiler = _compiler()
    sources = sorted(_HERE.glob("*.cpp"))
    texts = [path.read_bytes() for path in sorted(_HERE.glob("*.[ch]*")) if path.suffix != ".py"]
    flags = " ".join(_command(compiler, [Path(path.name) for path in sources], Path("out")))
    key = hashlib.sha256(
        b"\0".join([*texts, torch.__version__.encode(), flags.encode(), _cpu_id().encode()])
    ).hexdigest()[:16]
    folder = cache_dir() / "native" / key
    target = folder / "lowbit_native.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(suffix=".so.tmp", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(
            _command(compiler, sources, Path(temp)), capture_output=True, text=True, timeout=900
        )
        if done.returncode != 0:
            raise RuntimeError(f"building {target.name} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(temp, target)  # whole or not at all: a concurrent process loads either
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target


# How the kernels read zero points (see QuantizedTensor.zero_points).
ZERO_CENTER, ZERO_PACKED_INT, ZERO_FLOAT_STORAGE = 0, 1, 2


def supports(qt: QuantizedTensor) -> bool:
    """Whether the native kernels take ``qt``: on CPU, in the dense layout, kernels built."""
    return qt.device.type == "cpu" and qt.spec.layout == "dense" and available()


def weight_args(qt: QuantizedTensor) -> tuple:
    """The operators' description of ``qt``'s format, in their argument order: ``packed`` (uint8
    ``[rows, row bytes]``), ``bits``, ``group_len``, ``scale`` (``[1 or rows, groups]`` as stored),
    ``zero_kind`` (`ZERO_CENTER`: symmetric, ``zero`` None; `ZERO_PACKED_INT`: packed integer
    codes; `ZERO_FLOAT_STORAGE`: the block's value at the lowest code, ``z = vmin - zero / s``),
    ``zero``, ``center`` and ``vmin`` (the grid's centre and lowest value), ``values`` (float32
    ``[2**bits]``, every code's grid value, or None when a code is its own value)."""
    grid = get_grid(qt.spec.grid)
    bits = qt.spec.bits
    values = None
    if not grid.codes_are_values:
        values = torch.zeros(1 << bits, dtype=torch.float32)
        count = grid.level_count(bits)
        values[:count] = grid.decode(torch.arange(count, dtype=torch.uint8), bits)
    if qt.zero is None:
        zero_kind = ZERO_CENTER
    elif qt.spec.zero_point == "float":
        zero_kind = ZERO_FLOAT_STORAGE
    else:
        zero_kind = ZERO_PACKED_INT
    return (
        qt.packed.contiguous(),
        bits,
        qt.layout.group_len,
        qt.scale.contiguous(),
        zero_kind,
        None if qt.zero is None else qt.zero.contiguous(),
        float(grid.center(bits)),
        float(grid.value_range(bits)[0]),
        values,
    )


def _require(qt: QuantizedTensor) -> None:
    if not supports(qt):
        raise RuntimeError(
            f"lowbit's native kernels do not take {qt.spec.label} on {qt.device} "
            f"(built: {available()})"
        )


def dequantize_into(qt: QuantizedTensor, out: torch.Tensor, limit: float) -> torch.Tensor:
    """Fill ``out`` (``[rows, cols]`` float32/bfloat16/float16 with unit column stride) with
    ``qt``'s weights ``clamp((value(q) - z) * s, -limit, limit)``, rounded once to ``out``'s
    dtype: bit for bit the eager `QuantizedTensor.dequantize` (with ``rotated=True``).

    Raises:
        RuntimeError: `supports` is False for ``qt``, or ``out`` does not fit.
    """
    _require(qt)
    torch.ops.lowbit_native.dequantize_(*weight_args(qt), limit, out)
    return out


def linear(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """``x @ W.T`` for float32 ``x [tokens, in]`` (contiguous) and the 2-D ``qt`` ``[out, in]``:
    float32 ``[tokens, out]``. ``W`` is restored in float32 row by row inside the kernel (bit
    for bit ``qt.dequantize(torch.float32, rotated=True)``) and never written whole; sums are
    float32, so the result is within float32 rounding of ``F.linear`` with that weight.

    Raises:
        RuntimeError: `supports` is False for ``qt``, or ``x`` is not as described.
    """
    _require(qt)
    return torch.ops.lowbit_native.linear(x, *weight_args(qt), qt.shape[0])


# Bytes of float32 weight restored per tile in `linear_tiled`: the tile must stay in cache
# while the GEMM reads it (4 MiB measured best on the development machine's L3, 2026-12-08).
TILE_BYTES = 4 << 20


def tile_rows(in_features: int) -> int:
    """Rows per tile of `linear_tiled` for a weight with ``in_features`` (>= 1) columns (a
    multiple of 16, at least 16).

    Raises:
        ValueError: ``in_features`` is not a positive int.
    """
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    return max(16, TILE_BYTES // (4 * in_features) // 16 * 16)


def linear_tiled(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """``x @ W.T`` like `linear`, for larger batches: the weight is restored in float32 a tile
    of `tile_rows` rows at a time (into this thread's scratch buffer, `lowbit.workspace`) and
    each tile multiplied by PyTorch's GEMM while it is in cache. Returns float32 ``[tokens, out]``.

    Raises:
        RuntimeError: `supports` is False for ``qt``, or ``x`` is not contiguous float32
            ``[tokens, in]``.
    """
    _require(qt)
    rows = min(tile_rows(qt.shape[1]), qt.shape[0])
    tile = scratch((rows, qt.shape[1]), torch.float32, "cpu")
    return torch.ops.lowbit_native.linear_tiled(x, *weight_args(qt), qt.shape[0], rows, tile)
