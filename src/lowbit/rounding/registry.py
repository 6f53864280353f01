"""The name -> rounding step registry (``QuantSpec.rounding``)."""

from __future__ import annotations

from collections.abc import Callable

from lowbit.rounding.problem import Output, Problem

Rounding = Callable[[Problem, Output], None]

_ROUNDINGS: dict[str, Rounding] = {}


def register_rounding(name: str, step: Rounding) -> Rounding:
    """Add ``step(problem, output)`` under ``name``; a second step with the name is an error.

    A step fills ``output`` (every row's codes, every block's parameters) from ``problem``: it
    fits blocks with ``problem.fit_blocks`` when it reaches them, and may change the weights
    it has not rounded yet (error feedback) on its own float32 copy, never ``problem.matrix``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a rounding needs a non-empty str name, got {name!r}")
    if not callable(step):
        raise TypeError(f"rounding {name!r} must be callable, got {step!r}")
    if name in _ROUNDINGS:
        raise ValueError(f"rounding {name!r} is already registered")
    _ROUNDINGS[name] = step
    return step


def get_rounding(name: str) -> Rounding:
    """The step registered as ``name``; an unknown name raises listing the registered ones."""
    try:
        return _ROUNDINGS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown rounding {name!r}; registered: {sorted(_ROUNDINGS)}") from None


def available_roundings() -> list[str]:
    """Names of all registered rounding steps."""
    return sorted(_ROUNDINGS)
