"""QuantLinear: construction, fallback and kernel paths, dtype casts, state dicts, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import QuantLinear, QuantSpec, quantize
from lowbit.kernels import DEQUANTIZE, available_kernels, get_kernel
from lowbit.kernels.dispatch import DEQUANTIZE_FP32
from lowbit.tensor import QuantizedTensor

KERNEL_SPECS = [
    QuantSpec(bits=4, group_size=64),
    QuantSpec(bits=3, group_size=32, symmetric=True),
    QuantSpec(bits=8),
    QuantSpec(bits=8, symmetric=True, granularity="tensor"),
]
OTHER_SPECS = [QuantSpec(bits=4, group_size=16), QuantSpec(bits=2, group_size=8, symmetric=True)]


def make_linear(in_features=128, out_features=32, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def rel_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_buffers_of_a_new_layer():
    layer = QuantLinear(64, 16, spec=QuantSpec(bits=4, group_size=32))
    assert layer.packed.shape == (16, 32) and layer.packed.dtype == torch.uint8
    assert layer.scale.shape == (16, 2) and layer.scale.dtype == torch.float16
    assert layer.zero.shape == (16, 1) and layer.zero.dtype == torch.uint8
    assert torch.equal(layer.bias, torch.zeros(16))
    sym = QuantLinear(64, 16, bias=False, spec=QuantSpec(bits=8, symmetric=True))
    assert sym.zero is None and sym.bias is None
    assert set(sym.state_dict()) == {"packed", "scale"}
    assert QuantLinear(8, 4).spec == QuantSpec()
    assert "int4 g32 asym" in repr(layer) and "in_features=64" in repr(layer)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(TypeError, match="QuantSpec"):
        QuantLinear(8, 4, spec={"bits": 4})
    with pytest.raises(TypeError, match="dtype"):
        QuantLinear(8, 4, dtype=torch.int8)
    with pytest.raises(TypeError, match="dtype"):
        QuantLinear(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown kernel"):
        QuantLinear(8, 4, kernel="fastest")
    with pytest.raises(ValueError, match="bits=1"):
        QuantLinear(8, 4, spec=QuantSpec(bits=1))
    assert QuantLinear(8, 4, spec=QuantSpec(group_size=3)).scale.shape == (4, 3)  # partial


@pytest.mark.parametrize("spec", KERNEL_SPECS + OTHER_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_from_linear_matches_quantize(spec, dtype):
    linear = make_linear(dtype=dtype)
    layer = QuantLinear.from_linear(linear, spec)
    qt = quantize(linear.weight.detach(), spec)
    assert torch.equal(layer.dequantize_weight(), qt.dequantize())
    assert layer.dequantize_weight().dtype == dtype
    assert torch.equal(layer.bias, linear.bias)
    assert layer.weight_dtype == dtype and layer.spec == spec
    assert (layer.in_features, layer.out_features) == (128, 32)


def test_from_linear_keeps_the_bias_trainability():
    linear = make_linear()
    layer = QuantLinear.from_linear(linear, QuantSpec(bits=4, group_size=64))
    assert layer.bias.requires_grad and QuantLinear(128, 32).bias.requires_grad
    assert layer.bias.data_ptr() != linear.bias.data_ptr()
    linear.bias.requires_grad_(False)
    assert not QuantLinear.from_linear(linear, QuantSpec(bits=8)).bias.requires_grad


def test_built_and_loaded_models_compute_the_same():
    # Under grad mode the path depends on whether activations need a gradient, which depends
    # on the upstream bias: a quantized model and its reloaded copy must agree on it.
    spec = QuantSpec(bits=4, group_size=32)
    model = nn.Sequential(QuantLinear.from_linear(make_linear(128, 64), spec), nn.GELU())
    model.append(QuantLinear.from_linear(make_linear(64, 32), spec))
    fresh = nn.Sequential(
        QuantLinear(128, 64, spec=spec), nn.GELU(), QuantLinear(64, 32, spec=spec)
    )
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), model(x))


def test_from_linear_rejects_non_finite_weights():
    for bad in (float("nan"), float("inf")):
        linear = make_linear()
        with torch.no_grad():
            linear.weight[3, 7] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            QuantLinear.from_linear(linear, QuantSpec(bits=4, symmetric=True), name="layer 'fc'")


def test_from_quantized_checks_shapes():
    with pytest.raises(ValueError, match="2-D"):
        QuantLinear.from_quantized(quantize(torch.randn(4, 2, 8), QuantSpec()))
    with pytest.raises(ValueError, match="bias"):
        QuantLinear.from_quantized(quantize(torch.randn(4, 8), QuantSpec()), torch.zeros(5))


@pytest.mark.parametrize("spec", KERNEL_SPECS + OTHER_SPECS)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_dequantize_path_is_exactly_f_linear(spec, xdtype, bias):
    layer = QuantLinear.from_linear(make_linear(bias=bias), spec, kernel="dequantize")
    assert layer.selected_kernel() is None
    for shape in [(1, 128), (5, 128), (2, 3, 128), (128,)]:
        x = torch.randn(shape).to(xdtype)
        b = None if layer.bias is None else layer.bias.to(xdtype)
        want = F.linear(x, layer.dequantize_weight(xdtype), b)
        got = layer(x)
        assert got.dtype == xdtype and got.shape == (*shape[:-1], 32)
        assert torch.equal(got, want)


def expected_output(layer, x, path):
    """What ``layer(x)`` must return, bit for bit, when its plan sends ``x`` down ``path``."""
    if path == DEQUANTIZE:
        return F.linear(x, layer.dequantize_weight(x.dtype), layer.bias.to(x.dtype))
    if path == DEQUANTIZE_FP32:
        weight = layer.dequantize_weight(torch.float32)
        return F.linear(x.float(), weight, layer.bias.float()).to(x.dtype)
    kernel = get_kernel(path)
    return kernel.run(x, kernel.prepare(layer.quantized_weight), layer.bias)


@pytest.mark.parametrize("spec", KERNEL_SPECS + OTHER_SPECS)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("allow_bf16", [False, True])
def test_auto_path_follows_the_plan(spec, xdtype, allow_bf16):
    layer = QuantLinear.from_linear(make_linear(), spec, allow_bf16=allow_bf16)
    plan = layer.plan(dtype=xdtype)
    assert plan.steps[-1][0] is None
    for tokens in (1, 3, 8, 40, 100, 600):
        path = plan.path(tokens)
        x = torch.randn(tokens, 128).to(xdtype)
        got = layer(x)
        assert got.dtype == xdtype and got.shape == (tokens, 32)
        assert torch.equal(got, expected_output(layer, x, path))
        weight = layer.dequantize_weight(torch.float32).double()
        want = F.linear(x.double(), weight, layer.bias.double())
        if xdtype == torch.float32 and not allow_bf16:
            # fp32 in, fp32-accurate out: no bfloat16 kernel may serve it.
            assert path in (DEQUANTIZE, DEQUANTIZE_FP32) or get_kernel(path).fp32_exact
            assert rel_error(got, want) < 1e-6
        else:
            assert rel_error(got, want) < 1e-2
    x3 = torch.randn(2, 3, 128).to(xdtype)
    assert torch.equal(layer(x3), layer(x3.reshape(6, 128)).reshape(2, 3, 32))


@pytest.mark.parametrize("spec", OTHER_SPECS)
def test_auto_path_without_a_kernel_is_exact(spec, monkeypatch):
    monkeypatch.setenv("LOWBIT_NATIVE", "0")  # lowbit's own kernel takes every format
    layer = QuantLinear.from_linear(make_linear(), spec)
    assert layer.selected_kernel() is None
    assert layer.plan().summary() == DEQUANTIZE
    x = torch.randn(2, 128)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize_weight(), layer.bias))


def test_allow_bf16_is_checked_and_resets_the_plan():
    layer = QuantLinear.from_linear(make_linear(), QuantSpec(bits=4, group_size=64))
    with pytest.raises(TypeError, match="allow_bf16"):
        layer.allow_bf16 = 1
    with pytest.raises(TypeError, match="allow_bf16"):
        QuantLinear(8, 8, allow_bf16="yes")
    before = layer.plan()
    layer.allow_bf16 = True
    assert layer.plan() is not before


def test_named_kernel():
    name = "cpu_int4pack"
    if name not in available_kernels():
        pytest.skip(f"{name} is not registered")
    layer = QuantLinear.from_linear(make_linear(), QuantSpec(bits=4, group_size=64), kernel=name)
    assert layer.selected_kernel() is get_kernel(name)
    x = torch.randn(1, 128)
    want = get_kernel(name).run(x, get_kernel(name).prepare(layer.quantized_weight), layer.bias)
    assert torch.equal(layer(x), want)
    unsupported = QuantLinear.from_linear(
        make_linear(), QuantSpec(bits=4, group_size=16), kernel=name
    )
    with pytest.raises(ValueError, match="does not support"):
        unsupported(x)


@pytest.mark.parametrize("kernel", ["auto", "dequantize"])
def test_non_contiguous_inputs_match_contiguous_copy(kernel):
    for spec in KERNEL_SPECS[:3]:
        layer = QuantLinear.from_linear(make_linear(), spec, kernel=kernel)
        for xdtype in (torch.float32, torch.bfloat16):
            wide = torch.randn(4, 256).to(xdtype)
            for x in (wide[:, ::2], wide.t().contiguous().t()[:, :128], wide[:, 1:129]):
                assert not x.is_contiguous()
                got, want = layer(x), layer(x.contiguous())
                if layer.selected_kernel() is not None:
                    assert torch.equal(got, want)
                else:
                    # F.linear itself may sum in another order for other strides.
                    weight = layer.dequantize_weight(xdtype)
                    assert torch.equal(got, F.linear(x, weight, layer.bias.to(xdtype)))
                    assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_forward_rejects_bad_inputs():
    layer = QuantLinear.from_linear(make_linear(), QuantSpec(bits=4, group_size=64))
    for shape in [(2, 127), (2, 129), (128, 2), (0,)]:
        with pytest.raises(ValueError, match="last dim 128"):
            layer(torch.randn(shape))
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        with pytest.raises(TypeError, match="floating-point"):
            layer(torch.ones(2, 128, dtype=dtype))
    fallback = QuantLinear.from_linear(
        make_linear(), QuantSpec(bits=4, group_size=64), kernel="dequantize"
    )
    with pytest.raises(TypeError, match="floating-point"):
        fallback(torch.ones(2, 128, dtype=torch.int64))


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_fp16", "to_bf16"])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
def test_dtype_casts_keep_the_scales(cast, scale_dtype):
    spec = QuantSpec(bits=4, group_size=64, scale_dtype=scale_dtype)
    model = nn.Sequential(QuantLinear.from_linear(make_linear(), spec))
    layer = model[0]
    weight = layer.dequantize_weight(torch.float32)
    scale = layer.scale.clone()
    target = torch.float16 if cast in ("half", "to_fp16") else torch.bfloat16
    if cast == "half":
        model.half()
    elif cast == "bfloat16":
        model.bfloat16()
    else:
        model.to(target)
    assert layer.scale.dtype == scale.dtype and torch.equal(layer.scale, scale)
    assert layer.packed.dtype == torch.uint8 and layer.zero.dtype == torch.uint8
    assert layer.bias.dtype == target
    assert torch.equal(layer.dequantize_weight(torch.float32), weight)
    for tokens in (1, 40):
        x = torch.randn(tokens, 128)
        want = F.linear(x, weight, layer.bias.float())
        y = model(x.to(target))
        assert y.dtype == target
        assert rel_error(y, want) < 2e-2
    model.float()
    assert layer.scale.dtype == scale.dtype and layer.bias.dtype == torch.float32
    x = torch.randn(200, 128)  # above every kernel's max_tokens: the exact fallback
    assert torch.equal(model(x), F.linear(x, weight, layer.bias))


@pytest.mark.parametrize("spec", KERNEL_SPECS + OTHER_SPECS)
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(spec, bias):
    source = QuantLinear.from_linear(make_linear(bias=bias), spec)
    fresh = QuantLinear(128, 32, bias=bias, spec=spec)
    x_small, x_big = torch.randn(1, 128), torch.randn(40, 128)
    with torch.no_grad():
        fresh(x_small), fresh(x_big)  # build (and cache) layouts of the empty weight first
        fresh.load_state_dict(source.state_dict())
        for x in (x_small, x_big):
            assert torch.equal(fresh(x), source(x))
    assert torch.equal(fresh.dequantize_weight(), source.dequantize_weight())
    assert set(fresh.state_dict()) == set(source.state_dict())


def test_cached_dequantized_weight_is_refreshed():
    source = QuantLinear.from_linear(make_linear(), QuantSpec(bits=4, group_size=16))
    cached = QuantLinear(128, 32, spec=source.spec, cache_dequantized=True)
    x = torch.randn(3, 128)
    with torch.no_grad():
        cached(x)
        cached.load_state_dict(source.state_dict())
        assert torch.equal(cached(x), source(x))
        assert torch.equal(cached(x), cached(x))


@pytest.mark.parametrize("spec", KERNEL_SPECS[:2] + OTHER_SPECS[:1])
def test_gradient_flows_to_the_input(spec):
    layer = QuantLinear.from_linear(make_linear(), spec)
    x = torch.randn(2, 128, requires_grad=True)
    y = layer(x)
    weight = layer.dequantize_weight()
    kernel = layer.selected_kernel()
    with torch.no_grad():
        # Grad mode takes the same path as inference: the packed kernel when there is one.
        assert torch.equal(y, layer(x))
        if kernel is None:
            assert torch.equal(y, F.linear(x, weight, layer.bias))
    upstream = torch.randn(2, 32)
    y.backward(upstream)
    assert torch.allclose(x.grad, upstream @ weight, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.bias.grad, upstream.sum(0))
    assert layer.packed.grad is None


def test_empty_layers():
    spec = QuantSpec(bits=4)
    no_inputs = QuantLinear.from_quantized(quantize(torch.empty(4, 0), spec), torch.arange(4.0))
    y = no_inputs(torch.randn(3, 0))
    assert torch.equal(y, torch.arange(4.0).expand(3, 4))
    no_outputs = QuantLinear.from_quantized(quantize(torch.empty(0, 8), spec))
    assert no_outputs(torch.randn(3, 8)).shape == (3, 0)
    layer = QuantLinear.from_linear(make_linear(), QuantSpec(bits=4, group_size=64))
    assert layer(torch.randn(0, 128)).shape == (0, 32)


def test_layers_sharing_the_dequantization_workspace_stay_correct():
    # Fallback layers of one shape reuse one scratch buffer; outputs and gradients must not
    # see another layer's weight.
    spec = QuantSpec(bits=4, group_size=32)
    first = QuantLinear.from_linear(make_linear(64, 64), spec, kernel="dequantize")
    second = QuantLinear.from_linear(make_linear(64, 64, seed=1), spec, kernel="dequantize")
    w1, w2 = first.dequantize_weight(), second.dequantize_weight()
    assert not torch.equal(w1, w2)
    x = torch.randn(5, 64, requires_grad=True)
    y = second(torch.tanh(first(x)))
    with torch.no_grad():
        h = first(x)
        assert torch.equal(second(x), F.linear(x, w2, second.bias))
        assert torch.equal(h, F.linear(x, w1, first.bias))
    expected = F.linear(torch.tanh(F.linear(x, w1, first.bias)), w2, second.bias)
    assert torch.equal(y, expected)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(torch.tanh(F.linear(x2, w1, first.bias)), w2, second.bias).sum().backward()
    assert torch.allclose(x.grad, x2.grad)


def test_changing_the_kernel_takes_effect():
    layer = QuantLinear.from_linear(make_linear(), QuantSpec(bits=4, group_size=64))
    x = torch.randn(1, 128)
    assert layer.selected_kernel() is not None
    fast = layer(x)
    layer.kernel = "dequantize"
    assert layer.selected_kernel() is None
    assert torch.equal(layer(x), F.linear(x, layer.dequantize_weight(), layer.bias))
    assert not torch.equal(layer(x), fast)  # bf16 activations on the kernel path
    with pytest.raises(ValueError, match="unknown kernel"):
        layer.kernel = "no-such-kernel"


def test_fallback_scratch_is_one_buffer_the_size_of_the_largest_layer():
    from lowbit.nn import release_workspaces

    release_workspaces()
    spec = QuantSpec(bits=4, group_size=32)
    layers = [
        QuantLinear.from_linear(make_linear(64, 32, seed=i), spec, kernel="dequantize")
        for i in range(3)
    ] + [QuantLinear.from_linear(make_linear(128, 96), spec, kernel="dequantize")]
    with torch.no_grad():
        for layer in layers:
            layer(torch.randn(2, layer.in_features))
    assert release_workspaces() == 128 * 96 * 4  # one float32 buffer, the largest layer's
    assert release_workspaces() == 0


def test_turning_the_cache_off_frees_it():
    layer = QuantLinear.from_linear(make_linear(), QuantSpec(bits=8), kernel="dequantize")
    layer.cache_dequantized = True
    x = torch.randn(3, 128)
    layer(x)
    assert layer._dequantized is not None
    layer.cache_dequantized = False
    assert layer._dequantized is None
    assert torch.equal(layer(x), F.linear(x, layer.dequantize_weight(), layer.bias))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_features": -1}, "in_features"),
        ({"in_features": 4.5}, "in_features"),
        ({"out_features": "a"}, "out_features"),
        ({"bias": "yes"}, "bias"),
        ({"cache_dequantized": "no"}, "cache_dequantized"),
    ],
)
def test_constructor_arguments_are_checked(kwargs, message):
    args = {"in_features": 16, "out_features": 8, **kwargs}
    with pytest.raises(TypeError, match=message):
        QuantLinear(**args)


def test_fallback_works_in_and_out_of_inference_mode():
    layer = QuantLinear.from_linear(make_linear(), QuantSpec(bits=4, group_size=32))
    layer.kernel = "dequantize"
    x = torch.randn(3, 128)
    with torch.inference_mode():
        first = layer(x)
    assert torch.equal(layer(x), first)
    with torch.no_grad():
        assert torch.equal(layer(x), first)
    with torch.inference_mode():
        assert torch.equal(layer(x), first)


@pytest.mark.parametrize("kernel", ["auto", "dequantize"])
def test_partial_last_group_forward(kernel):
    # 576 inputs in groups of 128 (SmolLM2's hidden size, the most common group size): the
    # packed int4 kernel cannot take a partial group, so the layer must not pick it.
    linear = make_linear(576, 32, dtype=torch.bfloat16)
    layer = QuantLinear.from_linear(linear, QuantSpec(bits=4, group_size=128), kernel=kernel)
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    weight = layer.dequantize_weight(torch.bfloat16)
    chosen = layer.selected_kernel()
    assert chosen is None or "int4" not in chosen.name
    want = torch.nn.functional.linear(x, weight, linear.bias)
    assert torch.allclose(layer(x).float(), want.float(), rtol=2e-2, atol=2e-2)
    assert rel_error(weight, linear.weight) < 0.15


# --- bad input is refused with a clear error ---------------------------------------------------


def test_from_linear_refuses_a_quantlinear():
    # Re-quantizing the restored weight would add a second rounding to the first.
    layer = QuantLinear.from_linear(make_linear(), QuantSpec(bits=8))
    with pytest.raises(TypeError, match=r"already a QuantLinear \(int8 channel asym\)"):
        QuantLinear.from_linear(layer, QuantSpec(bits=4, group_size=32))


@pytest.mark.parametrize(
    ("linear", "spec", "error", "match"),
    [
        ("fc", QuantSpec(), TypeError, "from_linear takes an nn.Linear, got str"),
        (nn.Conv1d(4, 4, 1), QuantSpec(), TypeError, "got Conv1d"),
        (nn.Linear(8, 4), "int4", TypeError, "spec must be a QuantSpec, got str"),
        (nn.Linear(8, 4, device="meta"), QuantSpec(), ValueError, "meta device.*load real"),
        (nn.Linear(8, 4, dtype=torch.float64), QuantSpec(), TypeError, "float32, float16"),
    ],
)
def test_from_linear_refuses_bad_input(linear, spec, error, match):
    with pytest.raises(error, match=match):
        QuantLinear.from_linear(linear, spec)


def test_from_linear_refuses_a_meta_bias():
    linear = make_linear()
    linear.bias = nn.Parameter(torch.empty(32, device="meta"))
    with pytest.raises(ValueError, match="layer 'fc' is on the meta device"):
        QuantLinear.from_linear(linear, QuantSpec(bits=8), name="layer 'fc'")


def replace(qt, **changes):
    fields = {
        "packed": qt.packed,
        "scale": qt.scale,
        "zero": qt.zero,
        "spec": qt.spec,
        "shape": qt.shape,
        "dtype": qt.dtype,
        "signs": qt.signs,
    }
    return QuantizedTensor(**{**fields, **changes})


ASYM = QuantSpec(bits=4, group_size=4)
QT = quantize(torch.randn(4, 8), ASYM)
SYM_QT = quantize(torch.randn(4, 8), QuantSpec(bits=4, symmetric=True))


@pytest.mark.parametrize(
    ("qt", "error", "match"),
    [
        ("weights", TypeError, "qt must be a QuantizedTensor, got str"),
        (torch.randn(4, 8), TypeError, r"got Tensor \(quantize it first"),
        (replace(QT, packed=QT.packed[:, :2]), ValueError, r"'packed' has shape \[4, 2\]"),
        (replace(QT, scale=QT.scale.float()), ValueError, "'scale' has dtype torch.float32"),
        (replace(QT, scale=QT.scale * float("inf")), ValueError, "'scale' contains NaN or Inf"),
        (replace(QT, zero=None), ValueError, "missing its 'zero'"),
        (replace(QT, packed=QT.packed.to(torch.int8)), ValueError, "'packed' must be uint8"),
        (replace(SYM_QT, zero=QT.zero), ValueError, r"has \['zero'\] that its spec"),
        (replace(QT, dtype=torch.int32), TypeError, "qt.dtype must be float32"),
        (replace(QT, spec="int4"), TypeError, "qt.spec must be a QuantSpec"),
        (replace(QT, scale=QT.scale.tolist()), TypeError, "qt.scale must be a tensor"),
        (QT.to("meta"), ValueError, "meta device"),
        (replace(QT, scale=QT.scale.to("meta")), ValueError, "several devices"),
        (replace(QT, shape=torch.Size([4, 2, 4])), ValueError, "2-D weight"),
    ],
)
def test_from_quantized_refuses_bad_tensors(qt, error, match):
    with pytest.raises(error, match=match):
        QuantLinear.from_quantized(qt)


@pytest.mark.parametrize(
    ("bias", "error", "match"),
    [
        ([0.0] * 4, TypeError, "bias must be a tensor or None, got list"),
        (torch.zeros(4, dtype=torch.int32), TypeError, "bias must be float32, float16"),
        (torch.zeros(4, dtype=torch.float64), TypeError, "bias must be float32, float16"),
        (torch.zeros(5), ValueError, r"bias has shape \[5\], expected \[4\]"),
        (torch.zeros(1, 4), ValueError, r"bias has shape \[1, 4\]"),
        (torch.zeros(4, device="meta"), ValueError, "bias is on meta"),
    ],
)
def test_from_quantized_refuses_bad_biases(bias, error, match):
    with pytest.raises(error, match=match):
        QuantLinear.from_quantized(QT, bias)


def test_from_quantized_keeps_a_float_bias_of_another_dtype():
    bias = torch.arange(4.0, dtype=torch.bfloat16)
    layer = QuantLinear.from_quantized(QT, bias, kernel="dequantize")
    assert layer.bias.dtype == torch.bfloat16
    x = torch.randn(2, 8)
    want = F.linear(x, QT.dequantize(), torch.arange(4.0))
    assert torch.equal(layer(x), want)


def test_kernel_and_cache_settings_are_checked():
    with pytest.raises(TypeError, match="kernel must be a str"):
        QuantLinear(8, 4, kernel=3)
    layer = QuantLinear(8, 4)
    with pytest.raises(TypeError, match="kernel must be a str"):
        layer.kernel = None
    with pytest.raises(ValueError, match="unknown kernel 'fastest'"):
        layer.kernel = "fastest"
    assert layer.kernel == "auto"
    with pytest.raises(TypeError, match="cache_dequantized must be a bool"):
        layer.cache_dequantized = "no"  # bool("no") would be True
    assert layer.cache_dequantized is False
    with pytest.raises(TypeError, match="kernal"):
        QuantLinear.from_quantized(QT, kernal="dequantize")
