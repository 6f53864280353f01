"""lowbit.compat.distquant against the real distquant 0.1.0, its fixed faults, and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.compat import distquant as ours
from lowbit.distributions import FAMILIES, quantile_levels

real = pytest.importorskip("distquant.distquant")

SYMMETRIC = ("gaussian", "gaussian_cdf", "logistic", "logistic_cdf", "cauchy_cdf")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are small; on a shared 2-core machine two OpenMP threads stall behind
    other processes (this file took 100 s instead of 5 s). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(kind: str, size: int = 20_000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, generator=gen)
    if kind == "normal":
        return x * 0.05 + 0.01
    if kind == "heavy":  # Student-t with 3 degrees of freedom: outliers beyond 10 sigma
        chi = torch.randn(3, size, generator=gen).pow(2).sum(0)
        return x / (chi / 3).sqrt()
    if kind == "relu":
        return torch.relu(x + 2 * torch.rand(size, generator=gen))
    if kind == "exponential":
        return torch.empty(size).exponential_(2.0, generator=gen)
    raise ValueError(kind)


def _beta(dist: str, beta: float) -> float:
    # cauchy_cdf does not standardise, so its beta is in data units (distquant's own grid).
    return beta * 0.05 if dist == "cauchy_cdf" else beta


# --------------------------------------------------------------------------- equal to distquant


def test_grids_and_dist_names_are_distquants():
    assert list(ours.BETA_GRID) == real.BETA_GRID_LARGE
    assert list(ours.BETA_GRID_CAUCHY) == real.BETA_GRID_CAUCHY


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dist", ours.DISTS)
def test_codes_equal_distquant_at_fixed_beta(dist, dtype):
    x = _data("normal").to(dtype)
    zero = 0.0 if dist.startswith("exponential") else None
    for n in (2, 4, 15, 16):
        for beta in (0.5, 1.0, 3.162):
            b = _beta(dist, beta)
            q_ref, info_ref = real.quantize(x, n=n, dist=dist, beta=b, packbits=False, zero=zero)
            q, info = ours.quantize(x, n=n, dist=dist, beta=b, packbits=False, zero=zero)
            # Bit-equal wherever distquant is valid; where its CDF rounded to 1.0 it emitted
            # the out-of-range code n, and we emit n - 1 (the fault fixed here).
            assert torch.equal(q, q_ref.clamp(max=n - 1)), (dist, n, beta)
            assert info["loc"] == info_ref["loc"]
            assert info["scale"] == float(info_ref["scale"])
            if not (q_ref == n).any():
                assert info["abs_error"] == pytest.approx(info_ref["abs_error"], rel=1e-5)


@pytest.mark.parametrize("kind", ["normal", "heavy", "relu", "exponential"])
@pytest.mark.parametrize("dist", ours.DISTS)
def test_beta_search_no_worse_than_distquant(dist, kind):
    x = _data(kind, size=8_000)
    _, info_ref = real.quantize(x, k=2, dist=dist, packbits=False)
    _, info = ours.quantize(x, k=2, dist=dist, packbits=False)
    assert info["abs_error"] <= info_ref["abs_error"] * 1.01


@pytest.mark.parametrize("kind", ["normal", "heavy", "relu", "exponential"])
def test_dist_search_no_worse_than_distquant(kind):
    x = _data(kind, size=6_000, seed=1)
    for kwargs in ({"k": 3}, {"n": 7, "zero": 0.0}):
        _, info_ref = real.quantize(x, dist=None, **kwargs)
        _, info = ours.quantize(x, dist=None, **kwargs)
        assert info["abs_error"] <= info_ref["abs_error"] * 1.01
        assert set(info) == set(info_ref)


@pytest.mark.parametrize("dist", ["gaussian", "logistic_cdf", "gumbel", "exponential"])
@pytest.mark.parametrize("levels", [{"k": 1}, {"k": 2}, {"k": 3}, {"k": 5}, {"n": 15}, {"k": 8}])
def test_packed_output_decodes_both_ways(dist, levels):
    x = _data("normal", size=1_001)  # not a multiple of any codes-per-word: padding is used
    q, info = ours.quantize(x, dist=dist, **levels)
    q_ref, info_ref = real.quantize(x, dist=dist, beta=info["beta"], **levels)
    assert torch.equal(q, q_ref)  # the same int64 words
    mine = ours.dequantize(q, **info)
    # distquant decodes our words (it shifts its input in place: give it a copy) to the same
    # float32 values, and we decode its words and info (its gumbel scale is a 0-d tensor).
    assert torch.equal(real.dequantize(q.clone(), **info), mine)
    assert torch.equal(ours.dequantize(q_ref, **info_ref), mine)
    assert info["abs_error"] == pytest.approx((mine - x).abs().mean().item(), rel=1e-5)


# --------------------------------------------------------------------------- fixed faults


def test_out_of_range_code_fixed():
    x = _data("normal", size=4_096)
    x[7] = 1.0  # ~20 sigma: the gaussian CDF rounds to 1.0 in float32
    x[6] = -1.0  # code 0: the carry from x[7] will show
    q_ref, info_ref = real.quantize(x, k=2, dist="gaussian", beta=1.0, packbits=False)
    assert q_ref[7] == 4 and math.isnan(info_ref["abs_error"])  # distquant: code n, NaN
    q, info = ours.quantize(x, k=2, dist="gaussian", beta=1.0, packbits=False)
    assert q.max() == 3 and math.isfinite(info["abs_error"])
    # distquant's code n is read as n - 1, so its output decodes to finite values here.
    assert torch.equal(ours.dequantize(q_ref, **info_ref), ours.dequantize(q, **info))
    # Packed, distquant's code 4 carries into the neighbouring code; ours decodes correctly.
    p_ref, pinfo_ref = real.quantize(x, k=2, dist="gaussian", beta=1.0)
    p, pinfo = ours.quantize(x, k=2, dist="gaussian", beta=1.0)
    assert torch.equal(ours.dequantize(p, **pinfo), ours.dequantize(q, **info))
    bad = ours.dequantize(p_ref, **pinfo_ref) != ours.dequantize(q, **info)
    # distquant: the top bit of code 4 landed in x[6]'s field (0 -> 1), and x[7] read 0.
    assert bad.nonzero().flatten().tolist() == [6, 7]


def test_dequantize_leaves_input_alone():
    x = _data("normal", size=999)
    q, info = ours.quantize(x, k=3)
    kept = q.clone()
    ours.dequantize(q, **info)
    assert torch.equal(q, kept)
    real.dequantize(q, **info)  # distquant shifts the words in place (the fault fixed here)
    assert not torch.equal(q, kept)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input(dtype):
    x = _data("heavy", size=4_096).to(dtype)
    _, info_ref = real.quantize(x, k=4, dist="gaussian", beta=1.0)
    if dtype == torch.bfloat16:
        assert math.isnan(info_ref["abs_error"])  # distquant's fault
    q, info = ours.quantize(x, k=4, dist="gaussian", beta=1.0)
    _, info32 = ours.quantize(x.float(), k=4, dist="gaussian", beta=1.0)
    assert info == info32  # encoded in float32
    out = ours.dequantize(q, **info)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("dist", ours.DISTS)
@pytest.mark.parametrize("value", [0.0, 0.25, -3.0])
@pytest.mark.parametrize("size", [1, 37])
def test_constant_and_single_element(dist, value, size):
    x = torch.full((size,), value)
    q, info = ours.quantize(x, k=2, dist=dist)
    out = ours.dequantize(q, **info)
    assert torch.isfinite(out).all()
    if dist.split("_")[0] in ("gaussian", "logistic", "gumbel"):
        assert torch.equal(out, x)  # loc is the value, scale 0: exact
    elif value >= 0 or dist == "cauchy_cdf":
        assert (out - x).abs().max() <= 0.5 * abs(value) + 1e-3  # a level near the value
    # With zero at the value, every dist restores it exactly.
    _, info_odd = ours.quantize(x, n=3, dist=dist, zero=value)
    assert info_odd["abs_error"] == 0


def test_non_contiguous_input():
    w = _data("normal", size=64 * 48).view(64, 48)
    q, info = ours.quantize(w.t(), k=3, packbits=False)
    q_ref, _ = real.quantize(w.t().contiguous(), k=3, packbits=False, beta=info["beta"])
    assert info["shape"] == [48, 64] and torch.equal(q, q_ref)


@pytest.mark.parametrize("dist", SYMMETRIC)
@pytest.mark.parametrize("zero", [0.0, 0.015625, -0.5])
def test_zero_is_exactly_representable(dist, zero):
    x = _data("normal", size=5_000)
    q, info = ours.quantize(x, n=15, dist=dist, zero=zero, packbits=False)
    out = ours.dequantize(q, **info)
    assert info["loc"] == zero
    assert (out[q == 7] == zero).all()
    middle = ours.dequantize(torch.tensor([7]), **{**info, "shape": [1], "n_elems": 1})
    assert middle.item() == zero


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of k"),
        ({"k": 2, "n": 4}, ValueError, "exactly one of k"),
        ({"n": 1}, ValueError, "n must be in"),
        ({"k": 0}, ValueError, "k must be in"),
        ({"k": 17}, ValueError, "k must be in"),
        ({"k": 2.0}, TypeError, "k must be an int"),
        ({"k": 2, "dist": "normal"}, ValueError, "dist must be"),
        ({"k": 2, "beta": 0.0}, ValueError, "beta must be"),
        ({"k": 2, "beta": float("nan")}, ValueError, "beta must be"),
        ({"k": 2, "zero": 0.0}, ValueError, "needs an odd n"),
        ({"k": 2, "zero": 0.0, "dist": None}, ValueError, "needs an odd n"),
        ({"n": 5, "zero": "0"}, TypeError, "zero must be"),
        ({"k": 2, "packbits": 1}, TypeError, "packbits"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ours.quantize(torch.randn(10), **kwargs)


def test_bad_data():
    with pytest.raises(TypeError, match="floating-point"):
        ours.quantize(torch.arange(10), k=2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ours.quantize([0.0, 1.0], k=2)
    with pytest.raises(ValueError, match="empty"):
        ours.quantize(torch.empty(0), k=2)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or Inf"):
            ours.quantize(torch.tensor([0.0, bad, 1.0]), k=2)
    # exponential with an even n and a zero is fine (zero is the support's start)
    ours.quantize(torch.rand(10), k=2, dist="exponential", zero=0.0)


def test_dequantize_rejects_bad_codes():
    q, info = ours.quantize(torch.randn(10), k=2, packbits=False)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        ours.dequantize(q + 2, **info)
    with pytest.raises(ValueError, match="n_elems"):
        ours.dequantize(q[:5], **info)
    with pytest.raises(TypeError, match="integer tensor"):
        ours.dequantize(q.float(), **info)
    with pytest.raises(ValueError, match="packed q"):
        ours.dequantize(q, **{**info, "packbits": True})


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16), st.integers(1, 300), st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, count, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (count,), generator=gen)
    per_word = 64 // bits
    padded = torch.cat([codes, codes.new_zeros(-count % per_word)])
    words = ours._pack_words(padded, bits)
    assert words.numel() == -(-count // per_word)
    assert torch.equal(ours._unpack_words(words, bits, count), codes)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(ours.DISTS),
    st.integers(2, 40),
    st.integers(1, 500),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**31),
)
def test_encode_decode_properties(dist, n, count, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, generator=gen) * spread
    q, info = ours.quantize(x, n=n, dist=dist)
    unpacked, info_u = ours.quantize(x, n=n, dist=dist, packbits=False)
    assert info == {**info_u, "packbits": True}
    assert q.dtype == torch.int64 and 0 <= int(unpacked.min()) <= int(unpacked.max()) < n
    out = ours.dequantize(q, **info)
    assert torch.equal(out, ours.dequantize(unpacked, **info_u))
    assert info["abs_error"] == pytest.approx((out - x).abs().mean().item(), rel=1e-4, abs=1e-9)
    # Decoding is monotone in the code, and a decoded value re-encodes to its own code.
    spec = ours._DISTS[info["dist"]]
    table = ours._decode_table(spec, n, info["scale"], info["loc"], info["beta"], None)
    assert (table.diff() >= 0).all()
    levels = torch.arange(n)
    if info["scale"] > 0:
        again, _ = ours._encode(table, spec, n, info["loc"], info["scale"], info["beta"], False)
        assert torch.equal(again, levels)


# --------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_maps_invert(name):
    fam = FAMILIES[name]
    u = torch.linspace(1e-6, 1 - 1e-6, 2001, dtype=torch.float64)
    pairs = [(fam.cdf, fam.icdf), (fam.optimal_cdf, fam.optimal_icdf)]
    for cdf, icdf in pairs:
        if cdf is None:
            continue
        torch.testing.assert_close(cdf(icdf(u)), u, rtol=1e-9, atol=1e-12)
        assert (icdf(u).diff() > 0).all()
        if fam.symmetric:
            assert icdf(torch.tensor(0.5, dtype=torch.float64)) == 0
            torch.testing.assert_close(icdf(1 - u), -icdf(u), rtol=1e-9, atol=1e-12)
    levels, thresholds = quantile_levels(name, 9, optimal=False)
    assert levels.shape == (9,) and thresholds.shape == (8,)
    assert (thresholds > levels[:-1]).all() and (thresholds < levels[1:]).all()


def test_families_match_distquants_maps():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    pos = x.clamp(min=1e-3)
    for name, fam in FAMILIES.items():
        spec = ours._DISTS[f"{name}_cdf"]
        ref = spec.u(pos if name == "exponential" else x, 1.0)
        got = fam.cdf(pos if name == "exponential" else x)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
        if fam.optimal_cdf is not None:
            arg = pos if name == "exponential" else x
            torch.testing.assert_close(
                fam.optimal_cdf(arg), ours._DISTS[name].u(arg, 1.0), rtol=1e-6, atol=1e-9
            )


# --------------------------------------------------------------------------- levels

SWEEP_BETAS = (0.1, 0.5, 0.794, 1.0, 1.259, 3.162, 10.0)


@pytest.mark.parametrize("dist", ours.DISTS)
def test_levels_equal_distquants_for_all_bits_and_betas(dist):
    # Every code of every dist at 1..8 bits and several betas decodes to exactly distquant's
    # float32 value, with a realistic scale and loc (distquant's gumbel scale is a 0-d tensor).
    # The float64 quantiles rounded once differed by float32 roundings and, for gumbel_cdf, by
    # ~1e-5 relative (torch's Gumbel inverts through a Uniform(tiny, 1 - eps) base).
    for scale, loc in ((1.0, 0.0), (0.0371, 0.0123), (2.5, -1.3)):
        for k in range(1, 9):
            n = 2**k
            codes = torch.arange(n).repeat(3)  # positions across vector lanes and the tail
            for beta in SWEEP_BETAS:
                b = _beta(dist, beta)
                info = {
                    "dist": dist,
                    "scale": torch.tensor(scale) if dist.startswith("gumbel") else scale,
                    "loc": loc,
                    "n": n,
                    "packbits": False,
                    "beta": b,
                    "shape": [codes.numel()],
                    "n_elems": codes.numel(),
                }
                ref = real.dequantize(codes.clone(), **info)
                assert torch.isfinite(ref).all()
                assert torch.equal(ours.dequantize(codes, **info), ref), (dist, k, beta, scale)


@pytest.mark.parametrize("dist", ours.DISTS)
def test_quantize_then_dequantize_equals_distquant_at_8_bits(dist):
    x = _data("exponential" if dist.startswith("exponential") else "normal", size=3_001)
    for beta in (0.794, 1.0):
        b = _beta(dist, beta)
        q, info = ours.quantize(x, k=8, dist=dist, beta=b)
        q_ref, info_ref = real.quantize(x, k=8, dist=dist, beta=b)
        assert torch.equal(q, q_ref)
        mine = ours.dequantize(q, **info)
        assert torch.equal(real.dequantize(q_ref, **info_ref), mine)
        assert torch.equal(real.dequantize(q.clone(), **info), mine)


def test_odd_n_middle_level_is_the_location_for_symmetric_dists():
    # The one documented difference from distquant's levels: its logistic middle level is
    # 2 log(tan(pi/4)) in float32, not 0; ours is exactly loc, as for the other symmetric dists.
    for dist in SYMMETRIC:
        for n in (3, 15, 255):
            codes = torch.arange(n)
            info = {"dist": dist, "scale": 0.3, "loc": 0.125, "n": n, "packbits": False,
                    "beta": 0.794, "shape": [n], "n_elems": n}  # fmt: skip
            mine = ours.dequantize(codes, **info)
            ref = real.dequantize(codes.clone(), **info)
            assert mine[n // 2] == 0.125
            others = torch.arange(n) != n // 2
            assert torch.equal(mine[others], ref[others])
            torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
