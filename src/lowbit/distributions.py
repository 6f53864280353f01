"""Standard distribution families as vectorised CDFs, inverse CDFs and error-optimal companders.

Each family is the standard member (location 0, scale 1) of the gaussian, logistic, gumbel,
exponential or cauchy family. For every family four element-wise maps are provided, all taking
and returning tensors of any shape and floating dtype (float64 gives the most accurate tables):

* ``cdf(x)`` and ``icdf(u)``: the ordinary distribution function and its inverse. Quantizing
  ``floor(n * cdf(x))`` puts the same probability mass in every one of ``n`` bins.
* ``optimal_cdf(x)`` and ``optimal_icdf(u)``: the *error-optimal compander* for the mean absolute
  error. High-resolution quantization theory (Bennett, Panter-Dite) says the level density that
  minimises the mean ``|x - x_hat|^r`` is proportional to ``f(x)^(1 / (1 + r))``; for ``r = 1``
  that is ``sqrt(f)``, normalised. Its CDF is again a closed form for every family here but the
  cauchy one (``sqrt`` of the cauchy density is not integrable), whose entries are ``None``:

  =========== ====================================== ===============================
  family      ``sqrt(f)``, normalised                ``optimal_cdf(x)``
  =========== ====================================== ===============================
  gaussian    gaussian with variance 2               ``Phi(x / sqrt(2))``
  logistic    ``sech(x / 2) / (2 pi)``               ``2 / pi * arctan(exp(x / 2))``
  gumbel      ``exp(-x/2 - exp(-x)/2) / sqrt(2 pi)`` ``erfc(exp(-x / 2) / sqrt(2))``
  exponential exponential with rate 1/2              ``1 - exp(-x / 2)``, ``x >= 0``
  =========== ====================================== ===============================

The inverses are written so that a family symmetric about 0 maps ``u = 0.5`` to exactly ``0.0``
(a quantizer with an odd number of levels then represents its location exactly) and so that
both tails keep their relative accuracy (no ``1 - u`` cancellation on the short side).

The families are looked up by name in ``FAMILIES``; nothing here allocates at import.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Map = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Family:
    """One standard distribution family (location 0, scale 1) and its element-wise maps.

    Attributes:
        name: the family's name, the key in ``FAMILIES``.
        cdf: ``x -> P(X <= x)``, any shape, float dtype in and out.
        icdf: ``u -> x`` with ``cdf(x) = u`` for ``u`` in (0, 1); ``+-inf`` at 0 and 1.
        optimal_cdf: the mean-absolute-error-optimal compander (normalised ``sqrt`` of the
            density, integrated), or ``None`` where that density is not integrable (cauchy).
        optimal_icdf: its inverse, or ``None``.
        symmetric: the density is symmetric about 0, so ``icdf(0.5) == 0`` exactly.
    """

    name: str
    cdf: Map
    icdf: Map
    optimal_cdf: Map | None
    optimal_icdf: Map | None
    symmetric: bool


def _antisymmetric(lower: Map) -> Map:
    """``u -> lower(u)`` for ``u < 0.5``, ``-lower(1 - u)`` above and exactly 0 at 0.5.

    ``lower`` is accurate on (0, 0.5]; for ``u >= 0.5`` the difference ``1 - u`` is exact
    (Sterbenz), so the upper tail is as accurate as the lower one.
    """

    def icdf(u: torch.Tensor) -> torch.Tensor:
        upper = u > 0.5
        value = lower(torch.where(upper, 1 - u, u))
        value = torch.where(upper, -value, value)
        return torch.where(u == 0.5, torch.zeros_like(value), value)

    return icdf


def _gaussian_cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


def _gaussian_icdf(u: torch.Tensor) -> torch.Tensor:
    return _antisymmetric(torch.special.ndtri)(u)


def _gaussian_optimal_cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x / math.sqrt(2))


def _gaussian_optimal_icdf(u: torch.Tensor) -> torch.Tensor:
    return _gaussian_icdf(u) * math.sqrt(2)


def _logistic_icdf(u: torch.Tensor) -> torch.Tensor:
    # logit(u) = log(u) - log1p(-u): accurate in both tails.
    return _antisymmetric(lambda v: torch.log(v) - torch.log1p(-v))(u)


def _logistic_optimal_cdf(x: torch.Tensor) -> torch.Tensor:
    # 2/pi * arctan(exp(x/2)); exp overflows to inf for large x, arctan(inf) = pi/2 -> 1.
    return torch.arctan(torch.exp(x / 2)) * (2 / math.pi)


def _logistic_optimal_icdf(u: torch.Tensor) -> torch.Tensor:
    return _antisymmetric(lambda v: 2 * torch.log(torch.tan(v * (math.pi / 2))))(u)


def _gumbel_cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-torch.exp(-x))


def _gumbel_icdf(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))


def _gumbel_optimal_cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.special.erfc(torch.exp(-x / 2) / math.sqrt(2))


def _gumbel_optimal_icdf(u: torch.Tensor) -> torch.Tensor:
    # Invert erfc(exp(-x/2)/sqrt(2)) = u: exp(-x/2) = sqrt(2) * erfinv(1 - u).
    return -2 * torch.log(math.sqrt(2) * torch.erfinv(1 - u))


def _exponential_cdf(x: torch.Tensor) -> torch.Tensor:
    return -torch.expm1(-x.clamp(min=0))


def _exponential_icdf(u: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(-u)


def _exponential_optimal_cdf(x: torch.Tensor) -> torch.Tensor:
    return -torch.expm1(-x.clamp(min=0) / 2)


def _exponential_optimal_icdf(u: torch.Tensor) -> torch.Tensor:
    return -2 * torch.log1p(-u)


def _cauchy_cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.arctan(x) / math.pi + 0.5


def _cauchy_icdf(u: torch.Tensor) -> torch.Tensor:
    # tan(pi (u - 1/2)) = -1 / tan(pi u): the latter keeps relative accuracy for small u.
    return _antisymmetric(lambda v: -1 / torch.tan(v * math.pi))(u)


FAMILIES: dict[str, Family] = {
    "gaussian": Family(
        "gaussian",
        _gaussian_cdf,
        _gaussian_icdf,
        _gaussian_optimal_cdf,
        _gaussian_optimal_icdf,
        symmetric=True,
    ),
    "logistic": Family(
        "logistic",
        torch.sigmoid,
        _logistic_icdf,
        _logistic_optimal_cdf,
        _logistic_optimal_icdf,
        symmetric=True,
    ),
    "gumbel": Family(
        "gumbel",
        _gumbel_cdf,
        _gumbel_icdf,
        _gumbel_optimal_cdf,
        _gumbel_optimal_icdf,
        symmetric=False,
    ),
    "exponential": Family(
        "exponential",
        _exponential_cdf,
        _exponential_icdf,
        _exponential_optimal_cdf,
        _exponential_optimal_icdf,
        symmetric=False,
    ),
    "cauchy": Family("cauchy", _cauchy_cdf, _cauchy_icdf, None, None, symmetric=True),
}


def get_family(name: str) -> Family:
    """The family called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown distribution family {name!r}; known: {sorted(FAMILIES)}"
        ) from None


def quantile_levels(
    family: str, n: int, *, optimal: bool, dtype: torch.dtype = torch.float64, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels and decision thresholds of the ``n``-level quantile quantizer of a standard family.

    Code ``c`` covers ``u = (optimal_)cdf(x)`` in ``[c / n, (c + 1) / n)`` and decodes to the
    inverse at the bin's centre, ``(c + 0.5) / n``.

    Args:
        family: a key of ``FAMILIES``.
        n: number of levels, ``>= 2``.
        optimal: use the error-optimal compander instead of the plain CDF.
        dtype, device: of the returned tensors.

    Returns:
        ``(levels [n], thresholds [n - 1])``, both increasing: ``x`` gets code
        ``#{thresholds <= x}``.
    """
    fam = get_family(family)
    inverse = fam.optimal_icdf if optimal else fam.icdf
    if inverse is None:
        raise ValueError(f"family {family!r} has no error-optimal compander (sqrt(f) diverges)")
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    steps = torch.arange(n, dtype=torch.float64, device=device)
    levels = inverse((steps + 0.5) / n)
    thresholds = inverse(steps[1:] / n)
    return levels.to(dtype), thresholds.to(dtype)
