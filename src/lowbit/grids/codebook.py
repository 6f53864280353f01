"""Codebook grids: a sorted table of levels in [-1, 1]; code q stands for ``levels[q]``.

* ``nf4`` and ``fp4``: the exact 16-level tables bitsandbytes uses (NF4 from the QLoRA paper,
  FP4 an E2M1 float format normalised by 12). Hardcoded, as bitsandbytes does, so that files
  stay decodable whatever numerics a future torch has.
* distribution-optimal codebooks, any ``bits`` in 2..8 (``n = 2**bits`` levels), for the families
  ``gaussian``, ``logistic``, ``laplace`` (two-sided exponential, the natural form for weights),
  ``gumbel`` and ``exponential``: the MSE-optimal Lloyd-Max levels of the standard distribution
  (grid ``<family>``) or its quantile levels ``icdf((i + 1/2) / n)`` (grid
  ``<family>-quantile``); ``cauchy-quantile`` only, since Lloyd-Max does not exist for a law
  without a mean.

Levels are scaled so that ``max |level| == 1``; blocks are then scaled by a symmetric fit
(``absmax`` maps each block's largest magnitude onto the outermost level). Codebook grids take
symmetric specs only: an integer zero point has no meaning between unevenly spaced levels.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

import torch

from lowbit.distributions import FAMILIES
from lowbit.grids.registry import register_grid

if TYPE_CHECKING:  # grids sit below the spec, which asks them for its defaults
    from lowbit.spec import QuantSpec

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# bitsandbytes' FP4 (E2M1) values divided by 12, sorted; -0 and +0 are both kept, as there.
FP4_LEVELS = tuple(
    sorted(v / 12 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3))
)

# Inverse CDFs of the standard distributions, p in (0, 1), float64: `lowbit.distributions`'
# families, plus the two-sided exponential (laplace), the natural form for weights.
INVERSE_CDFS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    name: FAMILIES[name].icdf for name in ("gaussian", "logistic", "gumbel", "exponential")
}
INVERSE_CDFS["laplace"] = lambda p: -torch.sign(p - 0.5) * torch.log1p(-2 * (p - 0.5).abs())
INVERSE_CDFS["cauchy"] = FAMILIES["cauchy"].icdf
LLOYD_MAX_FAMILIES = ("gaussian", "logistic", "laplace", "gumbel", "exponential")
# Equal-probability samples of the distribution used as quadrature for Lloyd-Max.
_QUADRATURE_POINTS = 1 << 18
_LLOYD_ITERATIONS = 2000


def quantile_levels(family: str, n: int) -> torch.Tensor:
    """``icdf((i + 1/2) / n)`` for i < n, float64, scaled to ``max |level| == 1``."""
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    levels = INVERSE_CDFS[family](p)
    return levels / levels.abs().max()


@cache
def _lloyd_max(family: str, n: int) -> tuple[float, ...]:
    # Pure function of (family, n), cached. The quadrature samples are equal-probability
    # quantiles, hence sorted: every cell is a contiguous run, and its conditional mean comes
    # from a prefix sum in O(n log N) per Lloyd iteration.
    p = (torch.arange(_QUADRATURE_POINTS, dtype=torch.float64) + 0.5) / _QUADRATURE_POINTS
    samples = INVERSE_CDFS[family](p)
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), samples.cumsum(0)])
    levels = INVERSE_CDFS[family]((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    for _ in range(_LLOYD_ITERATIONS):
        cuts = torch.searchsorted(samples, (levels[1:] + levels[:-1]) / 2)
        edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([len(samples)])])
        counts = (edges[1:] - edges[:-1]).to(torch.float64)
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), levels)
        if torch.allclose(updated, levels, rtol=0, atol=1e-12):
            break
        levels = updated
    return tuple((levels / levels.abs().max()).tolist())


def lloyd_max_levels(family: str, n: int) -> torch.Tensor:
    """MSE-optimal ``n`` levels for the standard distribution, scaled to ``max |level| == 1``."""
    return torch.tensor(_lloyd_max(family, n), dtype=torch.float64)


class CodebookGrid:
    """Grid whose code ``q`` stands for ``levels(bits)[q]`` (sorted, within [-1, 1])."""

    codes_are_values = False

    def __init__(
        self, name: str, make_levels: Callable[[int], torch.Tensor], bits: tuple[int, int]
    ):
        self.name = name
        self._make_levels = make_levels
        self.min_bits, self.max_bits = bits
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def levels(self, bits: int) -> torch.Tensor:
        """float32 ``[2**bits]``, sorted ascending."""
        return self._table(bits)[0]

    def _table(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        if bits not in self._tables:
            self.check_bits(bits)
            levels = torch.as_tensor(self._make_levels(bits), dtype=torch.float32)
            self._tables[bits] = (levels, (levels[1:] + levels[:-1]) / 2)
        return self._tables[bits]

    def check_bits(self, bits: int) -> None:
        if not self.min_bits <= bits <= self.max_bits:
            allowed = (
                str(self.min_bits)
                if self.min_bits == self.max_bits
                else f"{self.min_bits}..{self.max_bits}"
            )
            raise ValueError(
                f"bits={bits} is out of range for grid {self.name!r} (supported: {allowed})"
            )

    def check_spec(self, spec: QuantSpec) -> None:
        self.check_bits(spec.bits)
        if not spec.symmetric and spec.zero_point != "float":
            raise ValueError(
                f"grid {self.name!r} is a codebook: it takes symmetric specs, or asymmetric ones "
                f"with zero_point='float' (an integer zero point means nothing between its levels)"
            )
        if spec.symmetric and not self.two_sided(spec.bits):
            raise ValueError(
                f"grid {self.name!r} is one-sided at {spec.bits} bits (levels from "
                f"{self.value_range(spec.bits)[0]:.3f} to 1): a symmetric scale would send every "
                f"negative weight to the lowest level; use symmetric=False, zero_point='float'"
            )

    def two_sided(self, bits: int) -> bool:
        """Whether the levels reach -1 as well as 1 (symmetric scaling makes sense)."""
        low, high = self.value_range(bits)
        return low <= -0.99 and high >= 0.99

    def level_count(self, bits: int) -> int:
        return int(self.levels(bits).numel())

    def preferred_layout(self, bits: int) -> str:
        return "dense"

    def value_range(self, bits: int) -> tuple[float, float]:
        levels = self.levels(bits)
        return float(levels[0]), float(levels[-1])

    def center(self, bits: int) -> float:
        return 0.0

    def encode_(self, normalized: torch.Tensor, bits: int) -> torch.Tensor:
        _, midpoints = self._table(bits)
        return torch.bucketize(normalized, midpoints.to(normalized.device)).to(torch.uint8)

    def decode(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        levels = self.levels(bits).to(codes.device)
        return levels[codes.long()]


def _fixed(levels: tuple[float, ...]) -> Callable[[int], torch.Tensor]:
    return lambda bits: torch.tensor(levels)


register_grid(CodebookGrid("nf4", _fixed(NF4_LEVELS), (4, 4)))
register_grid(CodebookGrid("fp4", _fixed(FP4_LEVELS), (4, 4)))
for _family in LLOYD_MAX_FAMILIES:
    register_grid(
        CodebookGrid(_family, lambda bits, f=_family: lloyd_max_levels(f, 1 << bits), (2, 8))
    )
for _family in INVERSE_CDFS:
    register_grid(
        CodebookGrid(
            f"{_family}-quantile", lambda bits, f=_family: quantile_levels(f, 1 << bits), (2, 8)
        )
    )
