"""What to do to a weight: the frozen, versioned, validated `QuantSpec`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from lowbit.grids import get_grid
from lowbit.layouts import get_layout

SPEC_VERSION = 1

GRANULARITIES = ("tensor", "channel", "group")
SCALE_DTYPES = ("float16", "bfloat16", "float32")
ROTATIONS = (None, "hadamard")
ZERO_POINTS = ("int", "float")
# Blocks are indexed with int64 and allocated whole: a bound well past any real row length, so
# that an absurd value is a clear error here rather than an overflow deep inside torch.
MAX_GROUP_SIZE = 2**31 - 1


@dataclass(frozen=True)
class QuantSpec:
    """How one weight tensor is quantized.

    A weight ``w`` of shape ``[out, in]`` is cut into blocks (the whole tensor, one output row,
    or ``group_size`` consecutive inputs of one row). Each block gets a ``scale`` (and, unless
    ``symmetric``, an integer ``zero`` point) chosen by ``fit``; each weight becomes a ``bits``-bit
    code ``q`` on ``grid`` and is restored as ``(grid_value(q) - zero) * scale``.

    Args:
        bits: code width. The ``"int"`` grid takes 2..8.
        group_size: inputs per block. Setting it implies ``granularity="group"``. Where it
            does not divide a row, the row's last group is partial (its own scale); where it is
            at least the row length, each row is one group.
        granularity: ``"tensor"`` (one scale), ``"channel"`` (one per output row, the default
            without ``group_size``) or ``"group"``.
        symmetric: ``True`` stores only a scale (zero fixed at the grid's centre, absmax fit);
            ``False`` stores a zero point per block too (min/max fit). ``None`` (the default)
            takes the grid's natural choice: symmetric for two-sided codebooks (``nf4``,
            ``fp4``, ``gaussian``, ...), asymmetric for ``int``, one-sided codebooks and any
            spec with ``zero_point="float"``. The resolved bool is what the spec stores.
        grid: name of a registered grid (``lowbit.grids.available_grids()``).
        fit: name of a registered scale search (``lowbit.fit.available_fits()``: ``minmax``,
            ``absmax``, ``mse``, ``hqq``, ``entropy``, ``percentile``); ``None`` means
            ``"absmax"`` for symmetric specs and ``"minmax"`` otherwise.
        fit_options: settings of the fit, a dict of JSON scalars (e.g. ``{"candidates": 50}``
            for ``mse``); unknown names are an error. Stored as a sorted tuple of pairs so the
            spec stays hashable; ``to_dict`` gives it back as a dict.
        scale_dtype: storage type of the scales: ``"float16"`` (default, as HQQ and llama.cpp),
            ``"bfloat16"`` or ``"float32"``.
        zero_point: for asymmetric specs, ``"int"`` (default: an integer code, packed at
            ``bits`` bits, the min/max range stretched to include 0 so 0.0 is exact) or
            ``"float"`` (a ``scale_dtype`` offset per block and the exact min/max range, as
            llama.cpp's Q4_1 and HQQ store it; also what lets codebook grids be asymmetric).
        layout: how codes are stored (a registered `lowbit.layouts` name: ``"dense"``, a bit
            stream of ``bits`` bits per code, or ``"base3"``, five codes of a grid with at most
            three levels per byte). ``None`` (the default) takes the grid's preferred layout;
            specs saved before layouts existed read as ``"dense"``.
        rounding: how values become codes once blocks are fitted: a registered
            `lowbit.rounding` step (``"nearest"``, the default; error-feedback methods such as
            GPTQ register theirs). It changes which codes are chosen, never how they are
            stored or restored.
        rotation: ``None`` or ``"hadamard"``: quantize ``W R^T`` with ``R`` a randomized
            block-diagonal Hadamard matrix (see `lowbit.rotation`); layers rotate their input
            to match. The random signs (from ``rotation_seed``) are stored with the weight.
    """

    bits: int = 8
    group_size: int | None = None
    granularity: str | None = None
    symmetric: bool | None = None
    grid: str = "int"
    fit: str | None = None
    fit_options: tuple[tuple[str, object], ...] | dict | None = None
    scale_dtype: str = "float16"
    zero_point: str = "int"
    rotation: str | None = None
    rotation_seed: int = 0
    layout: str | None = None
    rounding: str = "nearest"
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"QuantSpec.bits must be an int, got {self.bits!r}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be in 1..8, got {self.bits}")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise TypeError(
                    f"QuantSpec.group_size must be an int or None, got {self.group_size!r}"
                )
            if not 1 <= self.group_size <= MAX_GROUP_SIZE:
                raise ValueError(
                    f"QuantSpec.group_size must be in 1..{MAX_GROUP_SIZE}, got {self.group_size}"
                )
        granularity = self.granularity
        if granularity is None:
            granularity = "channel" if self.group_size is None else "group"
            object.__setattr__(self, "granularity", granularity)
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity must be one of {GRANULARITIES}, got {granularity!r}"
            )
        if granularity == "group" and self.group_size is None:
            raise ValueError("QuantSpec.group_size is required when granularity='group'")
        if granularity != "group" and self.group_size is not None:
            raise ValueError(
                f"QuantSpec.group_size={self.group_size} conflicts with granularity={granularity!r}"
            )
        if not isinstance(self.grid, str) or not self.grid:
            raise TypeError(f"QuantSpec.grid must be a grid name, got {self.grid!r}")
        if self.zero_point not in ZERO_POINTS:
            raise ValueError(
                f"QuantSpec.zero_point must be one of {ZERO_POINTS}, got {self.zero_point!r}"
            )
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", _natural_symmetry(self))
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"QuantSpec.symmetric must be a bool or None, got {self.symmetric!r}")
        if self.symmetric and self.zero_point == "float":
            raise ValueError(
                "QuantSpec.symmetric=True conflicts with zero_point='float': a symmetric spec "
                "stores no zero point; drop one of the two"
            )
        if self.fit is None:
            object.__setattr__(self, "fit", "absmax" if self.symmetric else "minmax")
        elif not isinstance(self.fit, str):
            raise TypeError(f"QuantSpec.fit must be a fit name, got {self.fit!r}")
        object.__setattr__(self, "fit_options", _normalize_options(self.fit_options))
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"QuantSpec.scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}"
            )
        if self.rotation not in ROTATIONS:
            raise ValueError(
                f"QuantSpec.rotation must be one of {ROTATIONS}, got {self.rotation!r}"
            )
        if isinstance(self.rotation_seed, bool) or not isinstance(self.rotation_seed, int):
            raise TypeError(f"QuantSpec.rotation_seed must be an int, got {self.rotation_seed!r}")
        if not 0 <= self.rotation_seed < 2**63:
            raise ValueError(
                f"QuantSpec.rotation_seed must be in [0, 2**63), got {self.rotation_seed}"
            )
        if not isinstance(self.rounding, str) or not self.rounding:
            raise TypeError(f"QuantSpec.rounding must be a rounding name, got {self.rounding!r}")
        _resolve_layout(self)
        if self.version != SPEC_VERSION:
            raise ValueError(
                f"QuantSpec.version {self.version} is not supported "
                f"(this lowbit reads {SPEC_VERSION})"
            )

    @property
    def label(self) -> str:
        """Short human name, e.g. ``int4 g64 asym``, ``int8 channel sym``, ``nf4 g64 sym``."""
        layout = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        kind = "sym" if self.symmetric else "asym" + ("-f" if self.zero_point == "float" else "")
        extra = "" if self.fit in ("absmax", "minmax") else f" {self.fit}"
        extra += " rot" if self.rotation else ""
        extra += "" if self.rounding == "nearest" else f" {self.rounding}"
        return f"{_grid_label(self.grid, self.bits)} {layout} {kind}{extra}"

    @property
    def options(self) -> dict:
        """``fit_options`` as a dict (empty when none were given)."""
        return dict(self.fit_options or ())

    def to_dict(self) -> dict:
        """Plain JSON-able dict; ``QuantSpec.from_dict`` inverts it exactly."""
        data = asdict(self)
        data["fit_options"] = self.options or None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        """Rebuild a spec from ``to_dict`` output; unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise TypeError(f"QuantSpec.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"QuantSpec.from_dict: unknown keys {sorted(unknown)}")
        return cls(**data)


def _grid_label(grid: str, bits: int) -> str:
    """``int`` at 4 bits -> ``int4``; a name that already ends in its width (``nf4``, ``fp4``)
    stays as it is, and any other name ending in a digit gets the width apart (``x2 3-bit``)."""
    if not grid[-1].isdigit():
        return f"{grid}{bits}"
    if grid.endswith(str(bits)) and not grid[-len(str(bits)) - 1 : -len(str(bits))].isdigit():
        return grid
    return f"{grid} {bits}-bit"


def _resolve_layout(spec: QuantSpec) -> None:
    """Set ``spec.layout`` to its grid's preferred layout when unset, and check that the layout
    exists and can hold the grid's codes (when the grid is registered: an unknown grid is
    reported when the spec is used)."""
    if spec.layout is not None and not isinstance(spec.layout, str):
        raise TypeError(f"QuantSpec.layout must be a layout name or None, got {spec.layout!r}")
    try:
        grid = get_grid(spec.grid)
    except ValueError:
        grid = None
    if spec.layout is None:
        preferred = getattr(grid, "preferred_layout", None)
        object.__setattr__(spec, "layout", preferred(spec.bits) if preferred else "dense")
    try:
        layout = get_layout(spec.layout)
    except ValueError as err:
        raise ValueError(f"QuantSpec.layout: {err}") from None
    if grid is not None:
        try:
            # A layout that takes every code of the width needs no exact count (a codebook's
            # count means computing its levels: seconds for 8-bit Lloyd-Max tables).
            layout.check(spec.bits, 1 << spec.bits)
            return
        except ValueError:
            pass
        try:
            levels = grid.level_count(spec.bits)
        except ValueError:
            return  # bits the grid does not take: its own check names them
        try:
            layout.check(spec.bits, levels)
        except ValueError as err:
            raise ValueError(
                f"QuantSpec.layout with grid {spec.grid!r} at {spec.bits} bits: {err}"
            ) from None


def _natural_symmetry(spec: QuantSpec) -> bool:
    """What ``symmetric=None`` means for ``spec``'s grid (see `QuantSpec`)."""
    if spec.zero_point == "float":
        return False
    # An unknown grid name is reported by `lowbit.grids.get_grid` when the spec is used, with
    # the list of registered ones (a grid may be registered after the spec is made).
    try:
        grid = get_grid(spec.grid)
    except ValueError:
        return False
    two_sided = getattr(grid, "two_sided", None)
    try:
        return bool(two_sided is not None and two_sided(spec.bits))
    except ValueError:  # bits out of the grid's range: the grid's check says so, by name
        return False


def _normalize_options(options) -> tuple[tuple[str, object], ...] | None:
    """``fit_options`` as a sorted tuple of (name, JSON scalar) pairs, or ``None`` if empty."""
    if options is None:
        return None
    if isinstance(options, tuple):
        try:
            options = dict(options)
        except (TypeError, ValueError):
            raise TypeError(
                f"QuantSpec.fit_options must be a dict of name -> value, got {options!r}"
            ) from None
    if not isinstance(options, dict):
        raise TypeError(
            f"QuantSpec.fit_options must be a dict of name -> value, got {type(options).__name__}"
        )
    for key, value in options.items():
        if not isinstance(key, str):
            raise TypeError(f"QuantSpec.fit_options: option names must be str, got {key!r}")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise TypeError(
                f"QuantSpec.fit_options[{key!r}] must be a number, bool, str or None, "
                f"got {type(value).__name__}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"QuantSpec.fit_options[{key!r}] must be finite, got {value}")
    return tuple(sorted(options.items())) or None
