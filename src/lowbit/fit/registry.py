"""The fit interface and the name -> fit registry.

A fit is a pure function ``fit(blocks, grid, spec) -> (scale, zero)``:

* ``blocks``: float32 ``[B, n]``, one row per block (a tensor, an output channel or a group);
* ``scale``: float32 ``[B]``, positive, or 0 for an all-zero block (restored as exact zeros on
  any grid, also codebooks without a zero level); a block holding NaN or Inf
  must get a non-finite scale (reductions such as ``amax`` propagate them), which is how
  ``quantize`` detects bad weights without another pass over the data;
* ``zero``: float32 ``[B]`` in grid value units for asymmetric specs (rounded later), or ``None``
  for symmetric ones (the grid's centre is used).

Fits are vectorised over all blocks at once and know nothing of modules, devices or files.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.grids import Grid
from lowbit.spec import QuantSpec

FitFn = Callable[[torch.Tensor, Grid, QuantSpec], tuple[torch.Tensor, "torch.Tensor | None"]]

_FITS: dict[str, FitFn] = {}


def register_fit(name: str) -> Callable[[FitFn], FitFn]:
    """Decorator: register ``fn`` as the fit called ``name``."""

    def decorate(fn: FitFn) -> FitFn:
        if name in _FITS:
            raise ValueError(f"fit {name!r} is already registered")
        _FITS[name] = fn
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
