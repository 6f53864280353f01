"""`Registry`: the name -> item table behind each registered axis (grids, layouts, roundings).

Each axis keeps its own checks of what an item must declare; the table only guarantees unique,
non-empty names and an error listing the registered names when one is unknown.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Items of one ``kind`` (``"grid"``, ``"layout"``, ...) by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` as ``name``; TypeError for an empty or non-str name, ValueError
        for a name already taken."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} needs a non-empty str name, got {name!r}")
        if name in self.items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self.items[name] = item
        return item

    def get(self, name: str) -> T:
        """The item registered as ``name``; ValueError listing the registered names if none."""
        try:
            return self.items[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {self.names()}") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self.items)
