"""distquant 0.1.0's API (distributional quantization), exact where distquant is valid, and fast.

``quantize(data, k=None, n=None, dist='gaussian', packbits=True, beta=None, zero=None)`` and
``dequantize(q, **info)`` have distquant's meaning: the data are standardised with moments
matched to ``dist``, mapped to ``u`` in [0, 1] by the family's CDF (``*_cdf`` names) or by its
mean-absolute-error-optimal compander (plain names, see ``lowbit.distributions``), and coded as
``floor(n * u)``; code ``c`` decodes to the inverse map at ``(c + 0.5) / n``. Codes and decoded
values are computed with distquant's own float32 steps and torch objects, so at a given ``beta``
the codes equal distquant's bit for bit and every code decodes to exactly distquant's float32
value (one documented exception below); packed words use distquant's int64 layout, so each
library decodes the other's output.

What is faster: distquant evaluates every ``beta`` of its grid (and, for ``dist=None``, every
family) with a full encode + decode pass over the data, ~330 passes. Here the data are sorted
once; a candidate's quantizer is ``n - 1`` thresholds and ``n`` levels, so its mean absolute
error is read off prefix sums of the sorted data with two ``searchsorted`` calls (``O(n log N)``
per candidate instead of ``O(N)``), for all candidates at once. One exact encode pass follows.

Fixed faults of distquant 0.1.0 (the API is unchanged):

* it emits the out-of-range code ``n`` when the CDF rounds to 1.0 (for ``gaussian`` in float32:
  beyond ~7.6 beta standard deviations): unpacked this decoded to NaN, packed (``n = 2**k``) it
  carried into the neighbouring code. Here such values get code ``n - 1`` (the top bin, where
  they belong); ``dequantize`` also reads a stray code ``n`` in distquant's output as ``n - 1``.
  distquant's ``beta`` search silently skipped every ``beta`` that produced such a NaN; here
  those candidates count with their real error, so the search can only do as well or better;
* its ``dequantize`` shifted the packed input in place (the caller's tensor was destroyed);
  here inputs are never modified;
* with an odd ``n`` its ``logistic`` middle level was ``loc + 2 log(tan(pi / 4)) * beta * scale``,
  off ``loc`` by a float32 rounding of ``tan``; here it is exactly ``loc`` (as it already was for
  the other symmetric dists), so ``zero`` is representable. Every other level is distquant's;
* bfloat16 / float16 input was encoded in that precision (the CDF rounds to 1.0 early: NaN);
  here it is encoded in float32;
* constant, all-zero and single-element tensors (zero or undefined standard deviation) and
  non-contiguous tensors raised; here they work. A tensor whose values all equal the
  location (``zero=None`` for gaussian, logistic, gumbel) is restored exactly (scale 0);
  otherwise ``max |x - loc|`` stands in for the standard deviation;
* bad arguments were ``assert``s (gone under ``python -O``) or crashes; here they are
  ``ValueError`` / ``TypeError`` naming the argument.

Deliberate differences beyond those fixes:

* ``dist=None`` with an explicit ``beta`` uses that ``beta`` for every family (distquant
  silently ignored it and searched);
* ``info['scale']`` is always a Python float (distquant gave a 0-d tensor for the gumbel
  families and the int 1 for ``cauchy_cdf``); both libraries accept either;
* at most 16 bits (65,536 levels): the float32 CDF cannot separate more bins;
* ``abs_error`` is accumulated in float64 (distquant: float32 mean), so it may differ in the
  last digits.

Like distquant, ``dequantize`` returns float32 whatever the input dtype was (``info`` does not
record it).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.distributions import FAMILIES, quantile_levels

# distquant's order: dist=None keeps the first of equally good dists, as distquant does.
DISTS = (
    "gaussian",
    "gaussian_cdf",
    "logistic",
    "logistic_cdf",
    "cauchy_cdf",
    "gumbel",
    "gumbel_cdf",
    "exponential",
    "exponential_cdf",
)

# distquant's beta grids, value for value (``BETA_GRID_LARGE`` and ``BETA_GRID_CAUCHY``: numpy
# logspaces rounded to 3 decimals; written out so that nothing is computed at import).
BETA_GRID = (
    0.1, 0.126, 0.158, 0.2, 0.251, 0.316, 0.398, 0.501, 0.631, 0.794,
    0.851, 0.871, 0.891, 0.912, 0.933, 0.955, 0.977, 0.99, 1.0, 1.01,
    1.023, 1.047, 1.072, 1.096, 1.122, 1.148, 1.175, 1.259, 1.585, 1.995,
    2.512, 3.162, 3.981, 5.012, 6.31, 7.943, 10.0,
)  # fmt: skip
BETA_GRID_CAUCHY = (
    0.001, 0.002, 0.003, 0.004, 0.006, 0.01, 0.016, 0.025, 0.04, 0.063,
    0.1, 0.158, 0.251, 0.398, 0.631, 1.0, 1.585, 2.512, 3.981, 6.31,
    10.0, 15.849, 25.119, 39.811, 63.096, 100.0, 158.489, 251.189, 398.107, 630.957,
    1000.0,
)  # fmt: skip

MAX_BITS = 16
_EULER_GAMMA = 0.5772156649  # distquant's constant, to 10 digits (gumbel location)
_WORDS_PER_CHUNK = 1 << 16  # int64 words per encode chunk: 64K-4M elements, bounded temporaries


@functools.cache
def _torch_dists() -> dict[str, torch.distributions.Distribution]:
    """The torch.distributions objects distquant computes its CDFs with (created on first use).

    Using the same objects and the same operation order as distquant is what makes the codes
    equal bit for bit; ``validate_args=False`` only skips the support check.
    """
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    return {
        "normal": torch.distributions.Normal(zero, one, validate_args=False),
        "exponential": torch.distributions.Exponential(one, validate_args=False),
        "gumbel": torch.distributions.Gumbel(zero, one, validate_args=False),
        "cauchy": torch.distributions.Cauchy(zero, one, validate_args=False),
    }


# u = map(t, beta) for standardised data t, in distquant's exact floating-point steps.
def _u_gaussian(t, beta):
    return _torch_dists()["normal"].cdf(t / math.sqrt(2) / beta)


def _u_gaussian_cdf(t, beta):
    return _torch_dists()["normal"].cdf(t / beta)


def _u_logistic(t, beta):
    return 2 * torch.arctan(torch.exp(t / beta / 2)) / math.pi


def _u_logistic_cdf(t, beta):
    return torch.sigmoid(t / beta)


def _u_gumbel(t, beta):
    return 1 - torch.erf(torch.exp(-t / 2 / beta) / math.sqrt(2))


def _u_gumbel_cdf(t, beta):
    # distquant's clamp keeps the value inside the support of torch's Gumbel (its uniform base).
    return _torch_dists()["gumbel"].cdf((t / beta).clamp(min=-4.46975, max=15.9424))


def _u_exponential(t, beta):
    return _torch_dists()["exponential"].cdf((torch.relu(t - 1e-8) + 1e-8) / 2 / beta)


def _u_exponential_cdf(t, beta):
    return _torch_dists()["exponential"].cdf((torch.relu(t - 1e-8) + 1e-8) / beta)


def _u_cauchy_cdf(t, beta):
    return _torch_dists()["cauchy"].cdf(t / beta)


# z = inverse(u) for float32 bin centres u, in distquant's decode steps; the level is then
# ``z * beta * scale + loc``. Not the float64 quantiles of lowbit.distributions: distquant's
# levels carry its float32 rounding, and torch's Gumbel inverts through a Uniform(tiny, 1 - eps)
# base (u is shrunk by 1 - 2**-23, ~1e-5 relative on the top gumbel_cdf levels), so only the
# same operations give the same values.
def _z_gaussian(u):
    return _torch_dists()["normal"].icdf(u) * math.sqrt(2)


def _z_gaussian_cdf(u):
    return _torch_dists()["normal"].icdf(u)


def _z_logistic(u):
    return torch.log(torch.tan(u / 2 * math.pi)) * 2


def _z_logistic_cdf(u):
    return torch.logit(u)


def _z_gumbel(u):
    return torch.log(1 / (2 * torch.special.erfinv(1 - u) ** 2))


def _z_gumbel_cdf(u):
    return _torch_dists()["gumbel"].icdf(u)


def _z_exponential(u):
    return _torch_dists()["exponential"].icdf(u) * 2


def _z_exponential_cdf(u):
    return _torch_dists()["exponential"].icdf(u)


def _z_cauchy_cdf(u):
    return _torch_dists()["cauchy"].icdf(u)


@dataclass(frozen=True)
class _Dist:
    """One of distquant's dist names: family, which map, how loc/scale come from the data."""

    family: str
    optimal: bool  # error-optimal compander (plain name) or ordinary CDF (``_cdf`` name)
    location: str  # "mean": loc = data mean (or zero); "fixed": loc = zero or 0 (std unused
    # for cauchy); "gumbel": loc = mean - gamma * scale (or zero)
    scale_factor: float | None  # scale = std * factor; None: scale 1 (cauchy_cdf)
    u: Callable[[torch.Tensor, float], torch.Tensor]
    z: Callable[[torch.Tensor], torch.Tensor]  # decode: u (bin centre) -> level before beta
    betas: tuple[float, ...]
    zero_needs_odd_n: bool


_DISTS: dict[str, _Dist] = {
    "gaussian": _Dist("gaussian", True, "mean", 1.0, _u_gaussian, _z_gaussian, BETA_GRID, True),
    "gaussian_cdf": _Dist(
        "gaussian", False, "mean", 1.0, _u_gaussian_cdf, _z_gaussian_cdf, BETA_GRID, True
    ),
    "logistic": _Dist(
        "logistic", True, "mean", math.sqrt(3), _u_logistic, _z_logistic, BETA_GRID, True
    ),
    "logistic_cdf": _Dist(
        "logistic",
        False,
        "mean",
        math.sqrt(3),
        _u_logistic_cdf,
        _z_logistic_cdf,
        BETA_GRID,
        True,
    ),
    "cauchy_cdf": _Dist(
        "cauchy", False, "fixed", None, _u_cauchy_cdf, _z_cauchy_cdf, BETA_GRID_CAUCHY, True
    ),
    "gumbel": _Dist("gumbel", True, "gumbel", math.sqrt(6), _u_gumbel, _z_gumbel, BETA_GRID, True),
    "gumbel_cdf": _Dist(
        "gumbel", False, "gumbel", math.sqrt(6), _u_gumbel_cdf, _z_gumbel_cdf, BETA_GRID, True
    ),
    # exponential: zero is the lower end of the support, not a level, so even n is allowed.
    "exponential": _Dist(
        "exponential", True, "fixed", 1.0, _u_exponential, _z_exponential, BETA_GRID, False
    ),
    "exponential_cdf": _Dist(
        "exponential",
        False,
        "fixed",
        1.0,
        _u_exponential_cdf,
        _z_exponential_cdf,
        BETA_GRID,
        False,
    ),
}


# --------------------------------------------------------------------------- argument checks


def _check_dist(dist) -> _Dist:
    if not isinstance(dist, str) or dist not in _DISTS:
        raise ValueError(f"dist must be None or one of {list(DISTS)}, got {dist!r}")
    return _DISTS[dist]


def _levels_from(k, n) -> int:
    if (k is None) == (n is None):
        raise ValueError(f"give exactly one of k (bits) or n (levels), got k={k!r}, n={n!r}")
    name, value = ("k", k) if k is not None else ("n", n)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if k is not None:
        if not 1 <= value <= MAX_BITS:
            raise ValueError(f"k must be in 1..{MAX_BITS} bits, got {value}")
        return 2**value
    if not 2 <= value <= 2**MAX_BITS:
        raise ValueError(f"n must be in 2..{2**MAX_BITS} levels, got {value}")
    return value


def _check_real(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(
            f"{name} must be a finite{' positive' if positive else ''} number, got {value!r}"
        )
    return value


def _flat_data(data) -> torch.Tensor:
    """``data`` flattened (copied if not contiguous), in float32 or float64."""
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
    if not data.is_floating_point():
        raise TypeError(f"data must be a floating-point tensor, got dtype {data.dtype}")
    if data.numel() == 0:
        raise ValueError("data is empty")
    # float16/bfloat16: distquant computed the CDF in that precision (it rounds to 1.0 -> NaN).
    dtype = torch.float64 if data.dtype == torch.float64 else torch.float32
    return data.detach().reshape(-1).to(dtype)


# --------------------------------------------------------------------------- moments


@dataclass(frozen=True)
class _Moments:
    """The data's mean and standard deviation as 0-d tensors of the data's dtype, computed as
    distquant computes them (``tensor.mean()``, unbiased ``tensor.std()``)."""

    x: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor) -> _Moments:
        mean = x.mean()
        # One element: the unbiased std is undefined (torch warns and gives NaN); use 0.
        std = x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)
        if not (torch.isfinite(mean) and torch.isfinite(std)):
            if not torch.isfinite(x).all():
                raise ValueError("data contains NaN or Inf")
            raise ValueError(
                "data's mean or standard deviation overflows "
                f"{x.dtype} (max |x| = {x.abs().max().item():g})"
            )
        return cls(x, mean, std)

    def loc_scale(self, spec: _Dist, zero: float | None) -> tuple[float, float]:
        """distquant's (loc, scale) for ``spec``, with the same 0-d tensor operations."""
        if spec.scale_factor is None:  # cauchy_cdf: no standardisation at all
            return (0.0 if zero is None else zero), 1.0
        std = self.std
        if not std > 0:
            # Constant (or single) data: distquant divided by 0. All values equal the
            # location -> scale 0 restores them exactly; else max |x - loc| stands in for std.
            centre = zero if zero is not None else (0.0 if spec.location == "fixed" else None)
            spread = (self.x - (self.mean if centre is None else centre)).abs().max()
            std = spread.to(self.x.dtype)
        if spec.location == "mean":
            # logistic: distquant divides by pi, then multiplies by sqrt(3) (in this order).
            scale = std if spec.scale_factor == 1.0 else std / math.pi * spec.scale_factor
            loc = self.mean.item() if zero is None else zero
        elif spec.location == "gumbel":
            scale = std * spec.scale_factor / math.pi
            loc = (self.mean - _EULER_GAMMA * scale).item() if zero is None else zero
        else:  # exponential: the support starts at zero (default 0.0)
            scale = std
            loc = 0.0 if zero is None else zero
        return float(loc), float(scale.item())


# --------------------------------------------------------------------------- search


def _candidate_errors(
    moments: _Moments, n: int, cands: list[tuple[_Dist, float, float, tuple[float, ...]]]
) -> list[torch.Tensor]:
    """Mean absolute error of every (dist, loc, scale, beta) candidate, without encoding.

    A candidate is a monotone quantizer: thresholds ``th_1 < ... < th_{n-1}`` (``x`` gets
    code ``#{th_j <= x}``) and levels ``l_0 .. l_{n-1}``. With the data sorted and prefix sums
    ``S``, bin ``c`` is the index range ``[a_c, b_c)``; splitting it at ``l_c`` gives
    ``sum |x - l_c| = l_c (m - a) - (S_m - S_a) + (S_b - S_m) - l_c (b - m)``.
    Returns one float64 tensor of errors per entry of ``cands`` (one value per beta).
    """
    x = moments.x
    xs = torch.sort(x).values.to(torch.float64)
    prefix = torch.zeros(xs.numel() + 1, dtype=torch.float64, device=x.device)
    torch.cumsum(xs, 0, out=prefix[1:])

    levels, thresholds, sizes = [], [], []
    for spec, loc, scale, betas in cands:
        # Levels: exactly what _decode_table gives (float32 betas: the cast that multiplying a
        # float32 tensor by a Python float does). Thresholds: the float64 quantiles, which the
        # float32 CDF of the encode step matches to its rounding.
        beta32 = torch.tensor(betas, dtype=torch.float32, device=x.device)[:, None]
        unit = _unit_levels(spec, n, x.device)
        levels.append((unit * beta32 * scale + loc).to(torch.float64))
        _, z_thresholds = quantile_levels(spec.family, n, optimal=spec.optimal, device=x.device)
        stretch = torch.tensor(betas, dtype=torch.float64, device=x.device)[:, None] * scale
        thresholds.append(loc + stretch * z_thresholds)
        sizes.append(len(betas))
    lev = torch.cat(levels)  # [C, n]
    thr = torch.cat(thresholds)  # [C, n - 1]

    count = xs.numel()
    bounds = torch.searchsorted(xs, thr)  # number of x < threshold
    edge = bounds.new_zeros(lev.shape[0], 1)
    start = torch.cat([edge, bounds], 1)
    end = torch.cat([bounds, edge + count], 1)
    split = torch.minimum(torch.maximum(torch.searchsorted(xs, lev), start), end)
    below = lev * (split - start) - (prefix[split] - prefix[start])
    above = (prefix[end] - prefix[split]) - lev * (end - split)
    errors = (below + above).sum(1) / count
    return list(torch.split(errors, sizes))


# --------------------------------------------------------------------------- encode / pack


def _bits(n: int) -> int:
    """Code width distquant packs ``n`` levels at: ``ceil(log2(n))``."""
    return (n - 1).bit_length()


def _unit_levels(spec: _Dist, n: int, device) -> torch.Tensor:
    """float32 ``[n]``: code ``c``'s level before ``beta``, scale and loc, as distquant decodes.

    distquant maps ``u = (float32(c) + 0.5) / n`` through ``spec.z``. For the symmetric
    families the middle code of an odd ``n`` (``u = 0.5`` exactly) gets exactly 0, so that its
    level is exactly ``loc``: distquant's ``logistic`` gave ``2 log(tan(pi / 4))``, a float32
    rounding away from 0 (the others give 0 already).
    """
    u = (torch.arange(n, device=device).float() + 0.5) / n
    z = spec.z(u)
    if n % 2 == 1 and FAMILIES[spec.family].symmetric:
        z[n // 2] = 0.0
    return z


def _decode_table(spec: _Dist, n: int, scale: float, loc: float, beta: float, device):
    """float32 ``[n]``: the value of each code, ``z * beta * scale + loc`` in float32 with
    distquant's order of operations (so equal to distquant's ``dequantize``, see
    ``_unit_levels``)."""
    return _unit_levels(spec, n, device) * beta * scale + loc


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes ``[W * per_word]`` -> int64 words ``[W]``, first code in the highest bits.

    distquant's layout: ``per_word = 64 // bits`` codes, shifted in one after another, so the
    last code of a word sits in its lowest bits and unused top bits are 0. The fields are
    disjoint, so their sum is their OR (and never overflows).
    """
    per_word = 64 // bits
    shifts = bits * torch.arange(per_word - 1, -1, -1, device=codes.device)
    return (codes.view(-1, per_word) << shifts).sum(1)


def _unpack_words(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``_pack_words``: int64 words ``[W]`` -> the first ``count`` int64 codes."""
    per_word = 64 // bits
    shifts = bits * torch.arange(per_word - 1, -1, -1, device=words.device)
    # >> is arithmetic on int64; the mask drops the copied sign bits.
    return ((words[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


def _encode(
    x: torch.Tensor, spec: _Dist, n: int, loc: float, scale: float, beta: float, packbits: bool
) -> tuple[torch.Tensor, float]:
    """Codes (packed int64 words or int64 codes ``[N]``) and the mean absolute error.

    Chunked so that temporaries stay a few MB whatever the size; every step is element-wise,
    so the codes do not depend on the chunking.
    """
    bits = _bits(n)
    per_word = 64 // bits
    chunk = _WORDS_PER_CHUNK * per_word
    table = _decode_table(spec, n, scale, loc, beta, x.device)
    count = x.numel()
    if packbits:
        out = torch.empty(-(-count // per_word), dtype=torch.int64, device=x.device)
    else:
        out = torch.empty(count, dtype=torch.int64, device=x.device)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for begin in range(0, count, chunk):
        part = x[begin : begin + chunk]
        if scale == 0:  # all values equal loc (see _Moments.loc_scale)
            t = torch.zeros_like(part)
        else:
            t = (part - loc) / scale  # distquant's standardisation, same float steps
        codes = (spec.u(t, beta) * n).floor_().long().clamp_(0, n - 1)  # clamp: distquant's n
        total += (table[codes] - part).abs().sum(dtype=torch.float64)
        if packbits:
            pad = -codes.numel() % per_word
            if pad:
                codes = torch.cat([codes, codes.new_zeros(pad)])
            out[begin // per_word : begin // per_word + codes.numel() // per_word] = _pack_words(
                codes, bits
            )
        else:
            out[begin : begin + chunk] = codes
    return out, (total / count).item()


# --------------------------------------------------------------------------- API


def quantize(data, k=None, n=None, dist="gaussian", packbits=True, beta=None, zero=None):
    """Distributional quantization of ``data``, distquant 0.1.0's ``quantize``.

    Args:
        data: float tensor of any shape (float16, bfloat16, float32, float64; any layout).
        k: bits; ``n = 2**k`` levels, 1 to 16. Exactly one of ``k`` and ``n``.
        n: number of levels, 2 to 65536 (packed at ``ceil(log2(n))`` bits).
        dist: one of ``DISTS``: a plain family name uses that family's error-optimal compander,
            a ``*_cdf`` name its ordinary CDF; ``None`` tries all nine and keeps the lowest
            mean absolute error (with the ``beta`` rule below for each).
        packbits: pack ``64 // ceil(log2(n))`` codes per int64 word (distquant's layout).
        beta: stretch of the quantizer's range; ``None`` searches distquant's grid
            (``BETA_GRID``, ``BETA_GRID_CAUCHY`` for ``cauchy_cdf``) for the lowest mean
            absolute error.
        zero: location of the quantizer instead of the fitted one; with odd ``n`` the middle
            level of the symmetric dists (gaussian, logistic, cauchy ones) is exactly
            ``zero`` (rounded to float32). Needs odd ``n`` except for the exponential dists,
            where it is the lower end of the support (default 0.0).

    Returns:
        ``(q, info)``. ``q``: int64, the packed words ``[ceil(N / (64 // bits))]`` or, with
        ``packbits=False``, the codes in ``data``'s shape, values in ``[0, n)``. ``info``:
        ``dist, scale, loc, n, packbits, beta, abs_error`` (mean ``|dequantize(q) - data|``),
        ``shape`` (list) and ``n_elems`` (N): exactly what ``dequantize`` needs.

    Raises:
        TypeError: ``data`` not a float tensor; ``k``/``n`` not ints; ``beta``/``zero`` not real.
        ValueError: not exactly one of ``k``, ``n``; out-of-range ``k``/``n``; unknown ``dist``;
            empty or non-finite data; ``beta <= 0``; ``zero`` with even ``n``.
    """
    n = _levels_from(k, n)
    specs = list(_DISTS.values()) if dist is None else [_check_dist(dist)]
    if not isinstance(packbits, bool):
        raise TypeError(f"packbits must be a bool, got {packbits!r}")
    if beta is not None:
        beta = _check_real("beta", beta, positive=True)
    if zero is not None:
        zero = _check_real("zero", zero)
        if n % 2 == 0 and any(s.zero_needs_odd_n for s in specs):
            raise ValueError(
                f"zero={zero!r} needs an odd n (the middle level is the zero), got n={n}"
                + (" (dist=None includes the symmetric dists)" if dist is None else "")
            )
    shape = list(data.shape) if isinstance(data, torch.Tensor) else None
    x = _flat_data(data)
    moments = _Moments.of(x)

    cands = []
    for spec in specs:
        loc, scale = moments.loc_scale(spec, zero)
        cands.append((spec, loc, scale, spec.betas if beta is None else (beta,)))
    if len(cands) == 1 and len(cands[0][3]) == 1:
        spec, loc, scale, (best_beta,) = cands[0]
    else:
        errors = _candidate_errors(moments, n, cands)
        # first minimum wins, in distquant's dist order and ascending beta, as in distquant.
        best = [int(e.argmin()) for e in errors]
        which = min(range(len(cands)), key=lambda i: (errors[i][best[i]].item(), i))
        spec, loc, scale, betas = cands[which]
        best_beta = betas[best[which]]

    q, abs_error = _encode(x, spec, n, loc, scale, best_beta, packbits)
    if not packbits:
        q = q.view(shape)
    name = next(name for name, s in _DISTS.items() if s is spec)
    info = {
        "dist": name,
        "scale": scale,
        "loc": loc,
        "n": n,
        "packbits": packbits,
        "beta": best_beta,
        "abs_error": abs_error,
        "shape": shape,
        "n_elems": x.numel(),
    }
    return q, info


def dequantize(
    q, *, dist, scale, loc, n, packbits, beta, shape, n_elems, abs_error=None
) -> torch.Tensor:
    """Values of the codes ``q``: distquant 0.1.0's ``dequantize(q, **info)``.

    Args:
        q: integer tensor from ``quantize`` (ours or distquant's): int64 packed words if
            ``packbits``, else codes in ``[0, n)`` of any shape with ``n_elems`` elements.
            Never modified.
        dist, scale, loc, n, packbits, beta, shape, n_elems: ``quantize``'s ``info``;
            ``scale`` may be a 0-d tensor (as distquant stores it for gumbel).
        abs_error: ignored (informational).

    Returns:
        float32 tensor of ``shape`` (float32 whatever the input dtype was, as in distquant).

    A code equal to ``n`` (distquant's overflow for values whose CDF rounded to 1.0) is read as
    ``n - 1``, the bin those values belong to; codes outside ``[0, n]`` raise ``ValueError``.
    """
    spec = _check_dist(dist)
    n = _levels_from(None, n)
    scale = _check_real("scale", float(scale) if isinstance(scale, torch.Tensor) else scale)
    loc = _check_real("loc", loc)
    beta = _check_real("beta", beta, positive=True)
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.is_complex():
        raise TypeError(f"q must be an integer tensor, got {getattr(q, 'dtype', type(q))}")
    shape = [int(s) for s in shape]
    if math.prod(shape) != n_elems:
        raise ValueError(f"shape {shape} does not hold n_elems={n_elems} elements")
    if packbits:
        bits = _bits(n)
        words = -(-n_elems // (64 // bits))
        if q.dtype != torch.int64 or q.numel() != words:
            raise ValueError(
                f"packed q must be {words} int64 words for n_elems={n_elems} at {bits} bits, "
                f"got {q.numel()} {q.dtype}"
            )
        codes = _unpack_words(q.reshape(-1), bits, n_elems)
    else:
        if q.numel() != n_elems:
            raise ValueError(f"q has {q.numel()} codes, info says n_elems={n_elems}")
        codes = q.reshape(-1).long()
    low, high = torch.aminmax(codes)
    if low < 0 or high > n:
        raise ValueError(f"codes must lie in [0, {n}), got [{int(low)}, {int(high)}]")
    codes = codes.clamp(max=n - 1)
    return _decode_table(spec, n, scale, loc, beta, codes.device)[codes].view(shape)
