"""The name -> rounding step registry (``QuantSpec.rounding``)."""

from __future__ import annotations

from collections.abc import Callable

from lowbit.registry import Registry
from lowbit.rounding.problem import Output, Problem

Rounding = Callable[[Problem, Output], None]

_REGISTRY: Registry[Rounding] = Registry("rounding")
_ROUNDINGS = _REGISTRY.items


def register_rounding(name: str, step: Rounding) -> Rounding:
    """Add ``step(problem, output)`` under ``name``; a second step with the name is an error.

    A step fills ``output`` (every row's codes, every block's parameters) from ``problem``: it
    fits blocks with ``problem.fit_blocks`` when it reaches them, and may change the weights
    it has not rounded yet (error feedback) on its own float32 copy, never ``problem.matrix``.
    """
    if not callable(step):
        raise TypeError(f"rounding {name!r} must be callable, got {step!r}")
    return _REGISTRY.add(name, step)


def get_rounding(name: str) -> Rounding:
    """The step registered as ``name``; an unknown name raises listing the registered ones."""
    return _REGISTRY.get(name)


def available_roundings() -> list[str]:
    """Names of all registered rounding steps."""
    return _REGISTRY.names()
