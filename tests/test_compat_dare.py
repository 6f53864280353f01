"""lowbit.compat.dare_quant: DARE's API, its objective row by row against a straightforward
per-row search (the seed's), and its fixed faults."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.compat.dare_quant import DAREQuantLinear
from lowbit.fit.dare import density_entropy


def seed_loss(w, w_hat, bins, lw, le):
    """DARE's per-row objective, written plainly with torch.histc."""
    r = w - w_hat
    lo, hi = r.min().item(), r.max().item()
    if lo == hi:
        lo, hi = lo - 1.0, hi + 1.0
    counts = torch.histc(r, bins=bins, min=lo, max=hi)
    density = counts / (r.numel() * (hi - lo) / bins)
    return lw * torch.mean(r**2).item() + le * -(density * torch.log(density + 1e-8)).sum().item()


def seed_search(w, bits, bins, lw, le):
    """The seed's per-row loop: 20 scales from max|w|/qmax to max|w|, least loss wins."""
    qmax = 2 ** (bits - 1) - 1
    best = float("inf")
    mx = w.abs().max()
    for s in torch.linspace(mx / qmax, mx, 20):
        w_hat = torch.clamp(torch.round(w / s), -qmax - 1, qmax) * s
        best = min(best, seed_loss(w, w_hat, bins, lw, le))
    return best


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([2, 3, 4, 8]),
    bins=st.sampled_from([16, 128]),
    le=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_every_row_meets_the_seeds_objective(seed, bits, bins, le):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(96, 12)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(12, 96, generator=g) * 0.05)
        linear.weight[3, 7] = 0.6  # one outlier row: clipping pays there
    layer = DAREQuantLinear(linear, bits=bits, bins=bins, lambda_entropy=le)
    for row in range(12):
        w, w_hat = linear.weight[row].detach(), layer.weight_q[row]
        ours = seed_loss(w, w_hat, bins, 1.0, le)
        assert ours <= seed_search(w, bits, bins, 1.0, le) + 1e-6 * (1 + abs(ours))


def test_density_entropy_matches_histc():
    r = torch.randn(3, 50)
    r[2] = 0.25  # constant: histc widens the range to [r - 1, r + 1]
    ours = density_entropy(r, 16)
    for row in range(3):
        expected = seed_loss(r[row], torch.zeros(50), 16, 0.0, 1.0)
        assert ours[row].item() == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_it_clips_where_the_seed_cannot():
    linear = nn.Linear(256, 64)
    with torch.no_grad():
        linear.weight.copy_(torch.distributions.StudentT(2.0).sample((64, 256)) * 0.02)
    layer = DAREQuantLinear(linear, bits=3, lambda_entropy=0.0)
    absmax_scale = linear.weight.detach().abs().amax(1) / 3
    assert (layer.scales < absmax_scale * 0.999).any()
    # with the entropy term off it is an MSE search: never worse than absmax rounding
    w = linear.weight.detach()
    q = torch.clamp(torch.round(w / absmax_scale[:, None]), -4, 3) * absmax_scale[:, None]
    assert ((layer.weight_q - w) ** 2).sum() < ((q - w) ** 2).sum()


def test_drop_in_module():
    linear = nn.Linear(64, 32)
    layer = DAREQuantLinear(linear)
    assert layer.weight_q.shape == linear.weight.shape
    assert layer.weight_q.dtype == linear.weight.dtype
    assert layer.bias is linear.bias
    assert "weight_q" in dict(layer.named_buffers())
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), F.linear(x, layer.weight_q, linear.bias))
    assert torch.equal(layer.quantized.dequantize(), layer.weight_q)
    codes = layer.quantized.codes()
    assert codes.dtype == torch.uint8 and int(codes.max()) < 16
    assert layer.quantized.spec.fit == "dare" and layer.quantized.spec.bits == 4
    assert "lambda_entropy=0.1" in repr(layer)
    no_bias = DAREQuantLinear(nn.Linear(64, 8, bias=False), bits=8)
    assert no_bias.bias is None and no_bias(x).shape == (5, 8)


def test_all_zero_rows_are_restored_exactly():
    linear = nn.Linear(32, 4)
    with torch.no_grad():
        linear.weight[1] = 0.0
    layer = DAREQuantLinear(linear)
    assert torch.equal(layer.weight_q[1], torch.zeros(32))
    assert torch.isfinite(layer.weight_q).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers(dtype):
    linear = nn.Linear(64, 16).to(dtype)
    layer = DAREQuantLinear(linear)
    assert layer.weight_q.dtype == dtype
    x = torch.randn(2, 64, dtype=dtype)
    assert layer(x).dtype == dtype
    rel = (layer.weight_q.float() - linear.weight.float()).norm() / linear.weight.float().norm()
    assert rel.item() < 0.15


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"bits": 1}, ValueError, "bits=1"),
        ({"bits": 9}, ValueError, "bits=9"),
        ({"bits": 4.0}, TypeError, "bits"),
        ({"bins": 0}, ValueError, "bins"),
        ({"lambda_entropy": -0.1}, ValueError, "lambda_entropy"),
        ({"lambda_weight": float("nan")}, ValueError, "lambda_weight"),
        ({"lambda_weight": "1"}, TypeError, "lambda_weight"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        DAREQuantLinear(nn.Linear(8, 4), **kwargs)


def test_bad_layers():
    with pytest.raises(TypeError, match="nn.Linear"):
        DAREQuantLinear(nn.Conv1d(4, 4, 1))
    linear = nn.Linear(8, 4)
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        DAREQuantLinear(linear)
    empty = DAREQuantLinear(nn.Linear(0, 4))
    assert empty.weight_q.shape == (4, 0)


@pytest.mark.parametrize("bits,le", [(4, 0.1), (3, 1.0), (2, 0.0)])
def test_compiled_pruned_search_meets_the_seeds_objective(monkeypatch, bits, le):
    # Large enough for the compiled path, which scores the histogram only of the candidates
    # its bounds cannot rule out: every row still meets the seed's loss, and it picks what the
    # eager search over every candidate picks.
    from lowbit.fit import fused

    g = torch.Generator().manual_seed(bits)
    linear = nn.Linear(1024, 160)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(160, 1024, generator=g) * 0.02)
        linear.weight[::7, 3] = 0.3  # outlier rows: clipping pays there
    monkeypatch.setenv("LOWBIT_COMPILE", "1")
    compiled = DAREQuantLinear(linear, bits=bits, lambda_entropy=le)
    if fused._broken:
        pytest.skip("torch.compile is unavailable here")
    monkeypatch.setenv("LOWBIT_COMPILE", "0")
    eager = DAREQuantLinear(linear, bits=bits, lambda_entropy=le)
    assert (compiled.scales == eager.scales).float().mean().item() > 0.99
    for row in range(0, 160, 9):
        w, w_hat = linear.weight[row].detach(), compiled.weight_q[row]
        ours = seed_loss(w, w_hat, 128, 1.0, le)
        assert ours <= seed_search(w, bits, 128, 1.0, le) + 1e-6 * (1 + abs(ours))


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 300),
    bins=st.sampled_from([1, 4, 128]),
    spread=st.sampled_from([0.0, 1e-6, 1e-3, 1.0, 100.0]),
)
def test_entropy_bounds_hold_the_density_entropy(seed, n, bins, spread):
    from lowbit.fit.dare import entropy_bounds

    g = torch.Generator().manual_seed(seed)
    r = torch.randn(4, n, generator=g) * spread
    r[1] = r[1].sign() * r[1].abs() ** 3  # a peaked one
    lo, hi = torch.aminmax(r, dim=-1)
    mse = (r * r).mean(-1)
    lower, upper = entropy_bounds(lo, hi, mse, n, bins, 1.0, 1.0)
    exact = mse + density_entropy(r, bins)
    slack = 1e-5 * exact.abs() + 1e-5
    assert (lower <= exact + slack).all() and (exact <= upper + slack).all()


@pytest.mark.parametrize("bits,bins", [(8, 16), (8, 128), (4, 16)])
def test_near_ties_round_as_the_seed_does(bits, bins):
    # Weights a hair from half-way between two levels of the absmax scale: codes must come
    # from round(w / s) exactly as in the seed; round(w * (1/s) + 128) rounded a third of
    # these rows the other way and their loss ended above the seed's (found in review).
    qmax = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(bits * bins)
    k = torch.randint(-qmax, qmax, (12, 96), generator=g).float()
    w = (k + 0.5 + (torch.rand(12, 96, generator=g) - 0.5) * 4e-6) * 0.01
    w[:, 0] = qmax * 0.01
    linear = nn.Linear(96, 12)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = DAREQuantLinear(linear, bits=bits, bins=bins)
    for row in range(12):
        ours = seed_loss(w[row], layer.weight_q[row], bins, 1.0, 0.1)
        assert ours <= seed_search(w[row], bits, bins, 1.0, 0.1) + 1e-6 * (1 + abs(ours))
