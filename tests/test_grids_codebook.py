"""Codebook grids: exact NF4/FP4 tables, distribution-optimal levels, and the whole pipeline."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.grids import CodebookGrid, available_grids, get_grid
from lowbit.grids.codebook import INVERSE_CDFS, LLOYD_MAX_FAMILIES, quantile_levels

CODEBOOKS = [name for name in available_grids() if isinstance(get_grid(name), CodebookGrid)]
# (grid, bits) pairs: fixed 4-bit tables, distribution codebooks at 2, 3, 4 and 8 bits.
CASES = [
    (name, bits)
    for name in CODEBOOKS
    for bits in range(get_grid(name).min_bits, get_grid(name).max_bits + 1)
    if bits in (2, 3, 4, 8)
]


def test_nf4_and_fp4_are_the_bitsandbytes_tables():
    nf4 = get_grid("nf4").levels(4)
    assert nf4[0] == -1.0 and nf4[7] == 0.0 and nf4[-1] == 1.0
    assert math.isclose(nf4[1].item(), -0.6961928009986877, rel_tol=1e-7)
    assert math.isclose(nf4[14].item(), 0.7229568362236023, rel_tol=1e-7)
    fp4 = sorted({round(v * 12, 6) for v in get_grid("fp4").levels(4).tolist()})
    assert fp4 == [-12, -8, -6, -4, -3, -2, -0.0625, 0, 0.0625, 2, 3, 4, 6, 8, 12]


@pytest.mark.parametrize("name, bits", CASES)
def test_levels_are_sorted_unit_range_and_complete(name, bits):
    levels = get_grid(name).levels(bits)
    assert levels.shape == (1 << bits,) and levels.dtype == torch.float32
    assert torch.all(levels[1:] >= levels[:-1])
    assert levels.abs().max() == 1.0


def test_gaussian_lloyd_max_matches_the_known_2_bit_quantizer():
    # Max (1960): the 4-level MSE-optimal quantizer of N(0, 1) has levels +-0.4528 and +-1.510.
    levels = get_grid("gaussian").levels(2)
    assert math.isclose(levels[2].item(), 0.4528 / 1.5104, rel_tol=2e-3)


@pytest.mark.parametrize("family", LLOYD_MAX_FAMILIES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lloyd_max_beats_quantile_levels_on_its_distribution(family, bits):
    gen = torch.Generator().manual_seed(bits)
    p = torch.rand(20_000, generator=gen, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    samples = INVERSE_CDFS[family](p)

    def best_mse(levels: torch.Tensor) -> float:
        # Each codebook at its best stretch over the distribution.
        best = math.inf
        for stretch in torch.linspace(0.5, 12, 80, dtype=torch.float64):
            grid = levels.double() * stretch
            codes = torch.bucketize(samples, (grid[1:] + grid[:-1]) / 2)
            best = min(best, (samples - grid[codes]).pow(2).mean().item())
        return best

    optimal = best_mse(get_grid(family).levels(bits))
    quantile = best_mse(quantile_levels(family, 1 << bits))
    assert optimal <= quantile * 1.001


@settings(max_examples=40, deadline=None)
@given(
    case=st.sampled_from(CASES),
    values=st.lists(st.floats(-1.5, 1.5, allow_nan=False), min_size=1, max_size=64),
)
def test_encode_picks_the_nearest_level_and_decode_inverts(case, values):
    name, bits = case
    grid = get_grid(name)
    x = torch.tensor(values, dtype=torch.float32)
    codes = grid.encode_(x.clone(), bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) < (1 << bits)
    levels = grid.levels(bits)
    chosen = (x - grid.decode(codes, bits)).abs()
    nearest = (x[:, None] - levels[None, :]).abs().min(dim=1).values
    assert torch.allclose(chosen, nearest, atol=1e-6)
    assert torch.equal(grid.encode_(grid.decode(codes, bits), bits), codes) or name == "fp4"


@pytest.mark.parametrize("name", ["nf4", "fp4", "gaussian", "logistic-quantile", "laplace"])
def test_codebook_specs_quantize_within_half_a_level_gap(name):
    w = torch.randn(64, 128)
    spec = lowbit.QuantSpec(bits=4, group_size=32, symmetric=True, grid=name)
    qt = lowbit.quantize(w, spec)
    assert qt.zero is None and qt.bits_per_weight == 4 + 16 / 32
    restored = qt.dequantize()
    levels = get_grid(name).levels(4)
    widest_gap = (levels[1:] - levels[:-1]).max()
    scale = qt.scale.float().repeat_interleave(32, dim=1)
    assert ((restored - w).abs() <= scale * widest_gap / 2 + 1e-6).all()
    assert ((restored - w).norm() / w.norm()) < 0.15


def test_codebook_layers_run_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))
    rules = {
        "0": lowbit.QuantSpec(bits=4, group_size=64, symmetric=True, grid="nf4"),
        "2": lowbit.QuantSpec(bits=3, group_size=32, symmetric=True, grid="gaussian"),
    }
    report = lowbit.quantize_model(model, rules, progress=False)
    assert [r.spec for r in report.quantized] == ["nf4 g64 sym", "gaussian3 g32 sym"]
    layer = model[0]
    # No PyTorch kernel takes codebooks; lowbit's own does, float32-accurately.
    assert layer.selected_kernel().name == "cpu_native"
    x = torch.randn(5, 128)
    want = F.linear(x.double(), layer.dequantize_weight().double(), layer.bias.double())
    assert torch.allclose(layer(x).double(), want, rtol=1e-5, atol=1e-6)
    lowbit.save(model, tmp_path / "m")
    fresh = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))
    lowbit.load(tmp_path / "m", fresh)
    assert torch.equal(fresh(x), model(x))


def test_codebooks_refuse_asymmetric_specs_and_wrong_bits():
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="'nf4'.*symmetric"):
        lowbit.quantize(w, lowbit.QuantSpec(bits=4, grid="nf4", symmetric=False))
    with pytest.raises(ValueError, match="bits=3.*'nf4'"):
        lowbit.quantize(w, lowbit.QuantSpec(bits=3, symmetric=True, grid="nf4"))
    with pytest.raises(ValueError, match="bits=9|bits must be in"):
        lowbit.QuantSpec(bits=9, symmetric=True, grid="gaussian")
    with pytest.raises(ValueError, match="unknown grid 'nf5'"):
        lowbit.quantize(w, lowbit.QuantSpec(bits=4, symmetric=True, grid="nf5"))
    with pytest.raises(ValueError, match="symmetric"):
        lowbit.QuantLinear(32, 8, spec=lowbit.QuantSpec(bits=4, grid="gaussian", symmetric=False))


def test_all_inverse_cdfs_are_increasing():
    p = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    for family, icdf in INVERSE_CDFS.items():
        assert torch.all(icdf(p)[1:] > icdf(p)[:-1]), family


@pytest.mark.parametrize("name", ["exponential", "exponential-quantile", "gumbel"])
def test_one_sided_codebooks_need_a_float_zero(name):
    w = torch.randn(16, 64) * 0.02
    with pytest.raises(ValueError, match="one-sided"):
        lowbit.quantize(w, lowbit.QuantSpec(bits=4, group_size=32, symmetric=True, grid=name))
    qt = lowbit.quantize(w, lowbit.QuantSpec(bits=4, group_size=32, grid=name, zero_point="float"))
    assert ((qt.dequantize() - w).norm() / w.norm()) < 0.3


def test_rotation_seed_range_is_checked():
    with pytest.raises(ValueError, match="rotation_seed"):
        lowbit.QuantSpec(rotation="hadamard", rotation_seed=2**64)
