"""The fit interface and the name -> fit registry.

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

Fits read their settings from ``spec.fit_options`` through `fit_options`, which merges the
defaults declared at registration and rejects unknown names. Fits are vectorised over all
blocks at once and know nothing of modules, devices or files.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.spec import QuantSpec

FitFn = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]

_FITS: dict[str, FitFn] = {}
_DEFAULTS: dict[str, dict] = {}


def register_fit(name: str, options: dict | None = None) -> Callable[[FitFn], FitFn]:
    """Decorator: register ``fn`` as the fit called ``name`` with ``options`` as its defaults."""

    def decorate(fn: FitFn) -> FitFn:
        if name in _FITS:
            raise ValueError(f"fit {name!r} is already registered")
        _FITS[name] = fn
        _DEFAULTS[name] = dict(options or {})
        return fn

    return decorate


def get_fit(name: str) -> FitFn:
    """The fit registered as ``name``; an unknown name raises listing the registered ones."""
    try:
        return _FITS[name]
    except KeyError:
        raise ValueError(f"unknown fit {name!r}; registered: {sorted(_FITS)}") from None


def available_fits() -> list[str]:
    """Names of all registered fits."""
    return sorted(_FITS)


def fit_defaults(name: str) -> dict:
    """The options fit ``name`` takes, with their defaults."""
    get_fit(name)
    return dict(_DEFAULTS[name])


def fit_options(spec: QuantSpec) -> dict:
    """``spec.fit_options`` merged over the defaults of ``spec.fit``.

    Raises:
        ValueError: an option the fit does not take, or a value of the wrong type.
    """
    defaults = fit_defaults(spec.fit)
    given = spec.options
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        known = ", ".join(sorted(defaults)) or "none"
        raise ValueError(f"fit {spec.fit!r} has no option(s) {unknown}; it takes: {known}")
    merged = dict(defaults)
    for key, value in given.items():
        default = defaults[key]
        if default is not None and value is not None and not _same_kind(default, value):
            raise TypeError(
                f"fit {spec.fit!r}: option {key!r} must be {type(default).__name__}, got {value!r}"
            )
        merged[key] = value
    return merged


def _same_kind(default, value) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, int):  # counts: a float (2.0, 2.9) is refused, not truncated
        return isinstance(value, int)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))
