"""CUDA paths: quantizing on the GPU, QuantLinear's tinygemm kernel and fallback, device moves.

Skipped on machines without a CUDA device (CI has none; run on a GPU machine).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.kernels import get_kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize(
    "spec",
    [
        lowbit.QuantSpec(bits=8),
        lowbit.QuantSpec(bits=4, group_size=64),
        lowbit.QuantSpec(bits=3, group_size=128, symmetric=True),
    ],
    ids=lambda s: s.label,
)
def test_quantize_on_gpu_matches_cpu(spec):
    w = torch.randn(256, 512)
    cpu = lowbit.quantize(w, spec)
    gpu = lowbit.quantize(w.cuda(), spec)
    assert gpu.packed.is_cuda
    assert torch.equal(gpu.scale.cpu(), cpu.scale)
    diff = (gpu.codes().cpu().int() - cpu.codes().int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # only exact .5 ties may differ
    torch.testing.assert_close(gpu.dequantize().cpu(), cpu.dequantize(), rtol=0, atol=1e-6 + 0.01)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
def test_tinygemm_kernel_matches_dequantize(bits, group, symmetric):
    spec = lowbit.QuantSpec(bits=bits, group_size=group, symmetric=symmetric)
    linear = torch.nn.Linear(1024, 512).cuda()
    layer = lowbit.QuantLinear.from_linear(linear, spec)
    kernel = get_kernel("cuda_int4_tinygemm")
    assert layer.selected_kernel() is kernel
    for tokens in (1, 8):
        x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), layer.dequantize_weight(torch.float32), layer.bias.float())
        y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == (tokens, 512)
        assert rel_err(y, ref) < 1e-2


def test_fallback_on_gpu_is_exact_and_large_batches_use_it():
    linear = torch.nn.Linear(576, 192).cuda()
    layer = lowbit.QuantLinear.from_linear(linear, lowbit.QuantSpec(bits=4, group_size=64))
    tokens = layer.selected_kernel().max_tokens + 1
    x = torch.randn(tokens, 576, device="cuda")
    expected = F.linear(x, layer.dequantize_weight(torch.float32), layer.bias)
    assert torch.equal(layer(x), expected)
    layer.kernel = "dequantize"
    torch.testing.assert_close(layer(x[:1]), expected[:1], rtol=1e-5, atol=1e-5)


def test_model_moves_between_devices_and_saves_bit_exact(tmp_path):
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)
    )
    lowbit.quantize_model(model, lowbit.QuantSpec(bits=4, group_size=32), progress=False)
    model = model.cuda().to(torch.bfloat16)
    assert model[0].scale.dtype == torch.float16 and model[0].scale.is_cuda
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    lowbit.save(model, tmp_path / "m")
    fresh = torch.nn.Sequential(
        torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)
    )
    lowbit.load(tmp_path / "m", fresh)
    assert torch.equal(fresh[0].packed, model[0].packed.cpu())
    assert torch.equal(fresh.cuda()(x), y)


@pytest.mark.parametrize("fit", ["mse", "hqq", "entropy", "percentile", "dare"])
@pytest.mark.parametrize("zero_point", ["int", "float"])
def test_every_fit_runs_on_the_gpu_like_on_the_cpu(fit, zero_point):
    w = torch.distributions.StudentT(3.0).sample((128, 256)) * 0.02
    importance = torch.rand(256)
    spec = lowbit.QuantSpec(bits=3, group_size=64, fit=fit, zero_point=zero_point)
    cpu = lowbit.quantize(w, spec, importance=importance)
    gpu = lowbit.quantize(w.cuda(), spec, importance=importance.cuda())
    assert gpu.packed.is_cuda and gpu.scale.is_cuda
    # The same search on another device: errors within a hair (ties may resolve differently).
    e_cpu = rel_err(cpu.dequantize(), w)
    e_gpu = rel_err(gpu.dequantize().cpu(), w)
    assert e_gpu <= e_cpu * 1.02 + 1e-6
