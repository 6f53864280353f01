"""The grid interface and the name -> grid registry."""

from __future__ import annotations

from typing import Protocol

import torch

from lowbit.registry import Registry


class Grid(Protocol):
    """A set of values a ``bits``-bit code can stand for, before the block's affine map.

    A weight is restored as ``(decode(q) - zero) * scale``. ``encode`` is the inverse of
    ``decode`` up to rounding: it maps normalised values ``w / scale + zero`` to the nearest code.
    """

    name: str
    #: ``decode(q) == q``: codes may be unpacked straight into floats, and an integer zero
    #: point is a code (the uniform grid). Codebooks map codes through a table.
    codes_are_values: bool

    def check_bits(self, bits: int) -> None:
        """Raise ``ValueError`` naming ``bits`` if this grid cannot use that width."""

    def check_spec(self, spec) -> None:
        """Raise ``ValueError`` if this grid cannot serve ``spec`` (bits, symmetry)."""

    def level_count(self, bits: int) -> int:
        """How many codes are valid at ``bits`` (``0 .. level_count - 1``)."""

    def preferred_layout(self, bits: int) -> str:
        """The storage layout (`lowbit.layouts`) a spec gets when it names none."""

    def value_range(self, bits: int) -> tuple[float, float]:
        """Smallest and largest ``decode`` value (used by the scale fits)."""

    def center(self, bits: int) -> float:
        """The zero point a symmetric block uses (``decode`` value that means 0.0)."""

    def encode_(self, normalized: torch.Tensor, bits: int) -> torch.Tensor:
        """Round float32 normalised values to codes, in place where possible; returns uint8."""

    def decode(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        """uint8 codes -> float32 grid values."""


_REGISTRY: Registry[Grid] = Registry("grid")
_GRIDS = _REGISTRY.items


# What a grid must declare (see `Grid`); call sites read these instead of probing.
REQUIRED = (
    "name",
    "codes_are_values",
    "check_bits",
    "check_spec",
    "level_count",
    "preferred_layout",
    "value_range",
    "center",
    "encode_",
    "decode",
)


def register_grid(grid: Grid) -> Grid:
    """Add ``grid`` under ``grid.name``; a second grid with the same name is an error, and so is
    a grid that lacks a member of the `Grid` protocol (TypeError naming them)."""
    missing = [member for member in REQUIRED if not hasattr(grid, member)]
    if missing:
        raise TypeError(f"grid {grid!r} lacks {missing} (see lowbit.grids.Grid)")
    return _REGISTRY.add(grid.name, grid)


def get_grid(name: str) -> Grid:
    """The grid registered as ``name``; an unknown name raises listing the registered ones."""
    return _REGISTRY.get(name)


def available_grids() -> list[str]:
    """Names of all registered grids."""
    return _REGISTRY.names()
