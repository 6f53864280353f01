"""The fit interface and the name -> fit registry, with what each fit declares about itself.

A fit is a pure function ``fit(blocks, grid, spec, weights=None) -> (scale, zero)``:

* ``blocks``: float32 ``[B, n]``, one row per block (a tensor, an output channel or a group);
* ``weights``: ``None`` or float32 ``[B, n]``, non-negative importance of each element (searching
  fits minimise the weighted error; range fits ignore it);
* ``scale``: float32 ``[B]``, positive, or 0 for an all-zero block (restored as exact zeros on
  any grid, also codebooks without a zero level); a block holding NaN or Inf
  must get a non-finite scale (reductions such as ``amax`` propagate them), which is how
  ``quantize`` detects bad weights without another pass over the data;
* ``zero``: float32 ``[B]`` in grid value units for asymmetric specs (rounded later), or ``None``
  for symmetric ones (the grid's centre is used).

A fit registers with its metadata (`FitInfo`): each option it takes as an `Option` (default,
type and allowed values), whether it uses importance weights, and whether it needs a grid with
levels on both sides of its centre. `fit_options` checks a spec's options against those
declarations, so every option error is known before any weight is touched (the CLI relies on
it to fail before loading a model). Fits are vectorised over all blocks at once and know
nothing of modules, devices or files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from lowbit.grids import get_grid
from lowbit.spec import QuantSpec

FitFn = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class Option:
    """One setting of a fit: its default and the values it allows.

    ``kind`` is ``int`` (a count: a float such as 2.0 is refused, not truncated), ``float`` (an
    int is accepted), ``bool`` or ``str``. Numbers must lie in ``[low, high]`` (either end may be
    ``None``: unbounded; ``low_open`` / ``high_open`` exclude the end itself; NaN never passes);
    strings must be one of ``choices`` when given; ``optional`` also allows ``None``. Build
    options with `int_option`, `float_option`, `choice_option` and `bool_option`.
    """

    default: object
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False

    @property
    def allowed(self) -> str:
        """The allowed values in words, as error messages give them (``in (0, 1]``)."""
        if self.kind is bool:
            return "a bool or None" if self.optional else "a bool"
        if self.choices:
            return " or ".join(repr(c) for c in self.choices)
        if self.kind is str:
            return "a str"
        low, high = self.low, self.high
        if low is not None and high is not None:
            if self.kind is int:
                return f"in {low}..{high}"
            if math.isinf(high) and self.high_open:
                return f"finite and {'>' if self.low_open else '>='} {low:g}"
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {opening}{low:g}, {high:g}{closing}"
        if low is not None:
            return f"{'>' if self.low_open else '>='} {low:g}"
        if high is not None:
            return f"{'<' if self.high_open else '<='} {high:g}"
        return f"a {self.kind.__name__}"

    def check(self, fit: str, name: str, value) -> None:
        """Raise ``TypeError`` (wrong type) or ``ValueError`` (out of range), naming the fit and
        the option, unless ``value`` is allowed."""
        if value is None:
            if self.optional:
                return
            raise TypeError(f"fit {fit!r}: option {name!r} must be {self._type_name()}, got None")
        if not _same_kind(self.kind, value):
            raise TypeError(
                f"fit {fit!r}: option {name!r} must be {self._type_name()}, got {value!r}"
            )
        if self.choices and value not in self.choices:
            raise ValueError(f"fit {fit!r}: {name} must be {self.allowed}, got {value!r}")
        if self.kind in (int, float) and not self._in_range(value):
            raise ValueError(f"fit {fit!r}: {name} must be {self.allowed}, got {value!r}")

    def _type_name(self) -> str:
        return self.kind.__name__ + (" or None" if self.optional else "")

    def _in_range(self, value) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None:
            return value < self.high if self.high_open else value <= self.high
        return True


def int_option(default: int, low: int | None = None, high: int | None = None) -> Option:
    """A count in ``low..high`` (inclusive; ``None``: unbounded)."""
    return Option(default, int, low, high)


def float_option(
    default: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Option:
    """A number in ``[low, high]`` (``low_open`` / ``high_open`` exclude an end; ``high=inf``
    with ``high_open`` asks for a finite value)."""
    return Option(default, float, low, high, low_open, high_open)


def choice_option(default: str, choices: tuple[str, ...]) -> Option:
    """One of the strings ``choices``."""
    return Option(default, str, choices=tuple(choices))


def bool_option(default: bool | None) -> Option:
    """A flag; a ``None`` default means "unset" (the fit decides) and may be given back."""
    return Option(default, bool, optional=default is None)


@dataclass(frozen=True)
class FitInfo:
    """A registered fit and what it declared at registration.

    Attributes:
        name: the name specs use (``QuantSpec.fit``).
        fn: the fit function.
        options: option name -> `Option`, in declaration order.
        uses_importance: whether the fit minimises an importance-weighted error (calibration
            data changes its result); range fits ignore the weights.
        two_sided: whether the fit needs a grid with levels on both sides of its centre (a
            symmetric range has nowhere to go on a one-sided grid).
    """

    name: str
    fn: FitFn
    options: Mapping[str, Option] = field(default_factory=dict)
    uses_importance: bool = False
    two_sided: bool = False

    @property
    def defaults(self) -> dict:
        """Option name -> default."""
        return {name: option.default for name, option in self.options.items()}


_FITS: dict[str, FitInfo] = {}


def register_fit(
    name: str,
    options: Mapping[str, Option] | None = None,
    *,
    uses_importance: bool = False,
    two_sided: bool = False,
) -> Callable[[FitFn], FitFn]:
    """Decorator: register ``fn`` as the fit called ``name`` (see `FitInfo` for the rest).

    Every declared default must itself be allowed by its option, so a spec without options is
    always valid.
    """
    options = dict(options or {})
    for key, option in options.items():
        if not isinstance(option, Option):
            raise TypeError(
                f"fit {name!r}: option {key!r} must be declared as an Option (int_option, "
                f"float_option, choice_option, bool_option), got {option!r}"
            )
        option.check(name, key, option.default)

    def decorate(fn: FitFn) -> FitFn:
        if name in _FITS:
            raise ValueError(f"fit {name!r} is already registered")
        _FITS[name] = FitInfo(name, fn, options, bool(uses_importance), bool(two_sided))
        return fn

    return decorate


def get_fit_info(name: str) -> FitInfo:
    """What fit ``name`` declared; an unknown name raises listing the registered ones."""
    try:
        return _FITS[name]
    except KeyError:
        raise ValueError(f"unknown fit {name!r}; registered: {sorted(_FITS)}") from None


def get_fit(name: str) -> FitFn:
    """The fit registered as ``name``; an unknown name raises listing the registered ones."""
    return get_fit_info(name).fn


def available_fits() -> list[str]:
    """Names of all registered fits."""
    return sorted(_FITS)


def fit_defaults(name: str) -> dict:
    """The options fit ``name`` takes, with their defaults."""
    return get_fit_info(name).defaults


def fit_uses_importance(name: str) -> bool:
    """Whether fit ``name`` weights its error by importance (calibration data matters)."""
    return get_fit_info(name).uses_importance


def fit_options(spec: QuantSpec) -> dict:
    """``spec.fit_options`` merged over the defaults of ``spec.fit``, checked against the fit's
    declarations (and the fit against the spec's grid); needs no weight.

    Raises:
        ValueError: an unknown fit, an option the fit does not take, a value outside its
            declared range (the message names the option), or a two-sided fit on a grid
            that is one-sided at ``spec.bits``.
        TypeError: a value of the wrong type.
    """
    info = get_fit_info(spec.fit)
    given = spec.options
    unknown = sorted(set(given) - set(info.options))
    if unknown:
        known = ", ".join(sorted(info.options)) or "none"
        raise ValueError(f"fit {spec.fit!r} has no option(s) {unknown}; it takes: {known}")
    merged = info.defaults
    for key, value in given.items():
        info.options[key].check(spec.fit, key, value)
        merged[key] = value
    if info.two_sided:
        check_two_sided(spec)
    return merged


def check_two_sided(spec: QuantSpec) -> None:
    """Raise ``ValueError`` if ``spec``'s grid has no levels below its centre at ``spec.bits``
    (fits that stretch a symmetric range, such as ``absmax``, cannot use it)."""
    grid = get_grid(spec.grid)
    if grid.value_range(spec.bits)[0] >= grid.center(spec.bits):
        raise ValueError(
            f"fit {spec.fit!r} needs a grid with levels on both sides of its centre; grid "
            f"{spec.grid!r} at {spec.bits} bits is one-sided: use fit='minmax' (or 'mse')"
        )


def _same_kind(kind: type, value) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is int:  # counts: a float (2.0, 2.9) is refused, not truncated
        return isinstance(value, int)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)
