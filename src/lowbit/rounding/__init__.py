"""Rounding steps: how a weight's values become codes once blocks can be fitted.

``nearest`` (each weight to its nearest code, blocks fitted independently) is registered here;
a method that rounds with error feedback (GPTQ) registers itself next to it with
`register_rounding` and is chosen with ``QuantSpec(rounding=...)``.
"""

from lowbit.rounding import nearest as _nearest  # noqa: F401  (registers "nearest")
from lowbit.rounding.problem import CHUNK_ELEMENTS, Output, Problem
from lowbit.rounding.registry import available_roundings, get_rounding, register_rounding

__all__ = [
    "CHUNK_ELEMENTS",
    "Output",
    "Problem",
    "available_roundings",
    "get_rounding",
    "register_rounding",
]
