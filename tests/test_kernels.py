"""Packed matmul kernels: every registered kernel against F.linear on the dequantized weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit import QuantSpec, quantize
from lowbit.kernels import Kernel, available_kernels, get_kernel, register_kernel, select_kernel

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
REL_TOL = 1e-2

# (label, weight shape, spec): the formats the CPU kernels are meant to take.
INT4_FORMATS = [
    (
        f"int{b}-g{g}-{'sym' if s else 'asym'}",
        (32, 256),
        QuantSpec(bits=b, group_size=g, symmetric=s),
    )
    for b in (2, 3, 4)
    for g in (32, 64, 128, 256)
    for s in (True, False)
] + [("int4-channel-k128", (48, 128), QuantSpec(bits=4))]
INT8_FORMATS = [
    (
        f"int{b}-{gran}-{'sym' if s else 'asym'}",
        (24, 64),
        QuantSpec(bits=b, granularity=gran, symmetric=s),
    )
    for b in range(2, 9)
    for gran in ("channel", "tensor")
    for s in (True, False)
]
CANDIDATES = INT4_FORMATS + INT8_FORMATS
EXPECTED_SUPPORT = {
    "cpu_int4pack": [label for label, _, _ in INT4_FORMATS],
    "cpu_int8pack": [label for label, _, _ in INT8_FORMATS],
}


def make_qt(shape, spec, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(shape, generator=gen) * 0.1, spec)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def reference(x, qt, bias):
    b = None if bias is None else bias.float()
    return F.linear(x.float(), qt.dequantize(torch.float32), b)


def test_registry_names():
    names = available_kernels()
    assert len(names) == len(set(names))
    for name in names:
        kernel = get_kernel(name)
        assert isinstance(kernel, Kernel) and kernel.name == name
        assert kernel.max_tokens >= 1
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        get_kernel("nope")
    if names:
        with pytest.raises(ValueError, match="already registered"):
            register_kernel(get_kernel(names[0]))
        assert available_kernels() == names


@pytest.mark.parametrize("name", sorted(EXPECTED_SUPPORT))
def test_cpu_kernels_take_their_formats(name):
    if name not in available_kernels():
        pytest.skip(f"{name} is not registered")
    kernel = get_kernel(name)
    by_label = {label: (shape, spec) for label, shape, spec in CANDIDATES}
    for label in EXPECTED_SUPPORT[name]:
        shape, spec = by_label[label]
        assert kernel.supports(make_qt(shape, spec), CPU), label


def test_every_kernel_is_exercised():
    # supports() only looks at the device type, so this holds even without the device.
    devices = [torch.device("cpu"), torch.device("cuda")]
    for name in available_kernels():
        kernel = get_kernel(name)
        assert any(
            kernel.supports(make_qt(shape, spec), device)
            for _, shape, spec in CANDIDATES
            for device in devices
        ), f"{name} takes none of the candidate formats"


@pytest.mark.parametrize(("label", "shape", "spec"), CANDIDATES, ids=[c[0] for c in CANDIDATES])
def test_kernels_match_dequantized_linear(label, shape, spec):
    ran = 0
    for device in DEVICES:
        qt = make_qt(shape, spec).to(device)
        for name in available_kernels():
            kernel = get_kernel(name)
            if kernel.supports(qt, device):
                check_kernel(kernel, qt, device)
                ran += 1
    if not ran:
        pytest.skip(f"no registered kernel takes {label} on {DEVICES}")


def check_kernel(kernel, qt, device):
    before = {k: v.clone() for k, v in qt.state_tensors().items()}
    out_features, in_features = qt.shape
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(out_features, generator=gen).to(device)
    prepared = kernel.prepare(qt)
    for tokens in (1, 7):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(tokens, in_features, generator=gen).to(device, dtype)
            for b in (None, bias):
                y = kernel.run(x, prepared, b)
                assert y.dtype == dtype and y.shape == (tokens, out_features)
                assert y.device.type == device.type
                err = rel_error(y, reference(x, qt, b))
                assert err < REL_TOL, (kernel.name, tokens, dtype, b is None, err)
    # No tokens at all: an empty result of the right shape.
    empty = kernel.run(torch.zeros(0, in_features, device=device), prepared, bias)
    assert empty.shape == (0, out_features)
    # Leading dims are kept; non-contiguous activations give the contiguous result.
    x3 = torch.randn(2, 3, in_features, generator=gen).to(device)
    y3 = kernel.run(x3, prepared, bias)
    assert y3.shape == (2, 3, out_features)
    assert rel_error(y3, reference(x3, qt, bias)) < REL_TOL
    wide = torch.randn(5, 2 * in_features, generator=gen).to(device, torch.bfloat16)
    for view in (wide[:, ::2], wide.t().contiguous().t()[:, :in_features]):
        assert not view.is_contiguous()
        want = kernel.run(view.contiguous(), prepared, bias)
        assert torch.equal(kernel.run(view, prepared, bias), want)
    for k, v in qt.state_tensors().items():
        assert torch.equal(v, before[k]), f"prepare changed {k}"


@pytest.mark.parametrize(
    ("shape", "spec", "why"),
    [
        ((24, 256), QuantSpec(bits=4, group_size=64), "out_features not a multiple of 16"),
        ((40, 256), QuantSpec(bits=4, group_size=128, symmetric=True), "out_features % 16"),
        ((32, 256), QuantSpec(bits=4, group_size=16), "group 16"),
        ((32, 256), QuantSpec(bits=4, group_size=8), "group 8"),
        ((32, 512), QuantSpec(bits=4, group_size=512), "group 512"),
        ((32, 256), QuantSpec(bits=5, group_size=64), "5 bits"),
        ((32, 256), QuantSpec(bits=8, group_size=64), "8 bits"),
        ((32, 4, 64), QuantSpec(bits=4, group_size=64), "3-D weight"),
        ((0, 256), QuantSpec(bits=4, group_size=64), "empty weight"),
    ],
)
def test_int4_kernel_refuses(shape, spec, why):
    if "cpu_int4pack" not in available_kernels():
        pytest.skip("cpu_int4pack is not registered")
    assert not get_kernel("cpu_int4pack").supports(make_qt(shape, spec), CPU), why


@pytest.mark.parametrize(
    ("shape", "spec", "why"),
    [
        ((32, 64), QuantSpec(bits=8, group_size=32), "group granularity"),
        ((32, 64), QuantSpec(bits=4, group_size=64), "group granularity, one group"),
        ((64,), QuantSpec(bits=8), "1-D weight"),
        ((8, 4, 16), QuantSpec(bits=8), "3-D weight"),
        ((0, 64), QuantSpec(bits=8), "empty weight"),
    ],
)
def test_int8_kernel_refuses(shape, spec, why):
    if "cpu_int8pack" not in available_kernels():
        pytest.skip("cpu_int8pack is not registered")
    assert not get_kernel("cpu_int8pack").supports(make_qt(shape, spec), CPU), why


def test_cpu_kernels_refuse_other_devices():
    qt = make_qt((32, 256), QuantSpec(bits=4, group_size=64))
    for name in available_kernels():
        if name.startswith("cpu_"):
            assert not get_kernel(name).supports(qt, torch.device("meta"))


@pytest.mark.parametrize(
    ("label", "shape", "spec"), CANDIDATES[::5], ids=[c[0] for c in CANDIDATES[::5]]
)
def test_select_kernel_takes_the_first_supporting_kernel(label, shape, spec):
    qt = make_qt(shape, spec)
    chosen = select_kernel(qt, CPU)
    supporting = [n for n in available_kernels() if get_kernel(n).supports(qt, CPU)]
    assert (chosen.name if chosen else None) == (supporting[0] if supporting else None)


def test_select_kernel_none_for_unsupported_formats(monkeypatch):
    qt = make_qt((24, 48), QuantSpec(bits=4, group_size=16))
    assert select_kernel(qt, CPU).name == "cpu_native"  # lowbit's own takes every dense format
    monkeypatch.setenv("LOWBIT_NATIVE", "0")  # without it, no PyTorch kernel takes group 16
    assert select_kernel(qt, CPU) is None
    assert (
        select_kernel(make_qt((32, 256), QuantSpec(bits=4, group_size=64)), torch.device("meta"))
        is None
    )


def dummy_kernel(**overrides):
    fields = {
        "name": "test_dummy",
        "supports": lambda qt, device: False,
        "prepare": lambda qt: {},
        "run": lambda x, prepared, bias: x,
        "max_tokens": 8,
    }
    return Kernel(**{**fields, **overrides})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"name": ""}, "name must be a non-empty str"),
        ({"name": 3}, "name must be a non-empty str"),
        ({"run": "F.linear"}, "run must be callable"),
        ({"max_tokens": -1}, "max_tokens must be an int >= 0"),
        ({"max_tokens": 1.5}, "max_tokens must be an int >= 0"),
        ({"max_tokens": True}, "max_tokens must be an int >= 0"),
        ({"priority": 1.5}, "priority must be an int"),
        ({"priority": None}, "priority must be an int"),
    ],
)
def test_malformed_kernels_are_refused(overrides, match):
    with pytest.raises(TypeError, match=match):
        dummy_kernel(**overrides)


def test_register_kernel_checks_its_argument():
    before = available_kernels()
    with pytest.raises(TypeError, match="register_kernel takes a Kernel, got str"):
        register_kernel("cpu_int4pack")
    # QuantLinear reads these names as settings: a kernel under them could never be chosen.
    for name in ("auto", "dequantize"):
        with pytest.raises(ValueError, match="reserved"):
            register_kernel(dummy_kernel(name=name))
    with pytest.raises(ValueError, match="already registered"):
        register_kernel(dummy_kernel(name=before[0]))
    assert available_kernels() == before


def test_get_kernel_and_select_kernel_check_their_arguments():
    with pytest.raises(TypeError, match="kernel name must be a str, got 3"):
        get_kernel(3)
    with pytest.raises(ValueError, match="unknown kernel 'fastest'"):
        get_kernel("fastest")
    qt = make_qt((32, 256), QuantSpec(bits=4, group_size=64))
    with pytest.raises(TypeError, match="qt must be a QuantizedTensor, got Tensor"):
        select_kernel(torch.randn(32, 256), CPU)
    # A device name works as a torch.device does.
    assert select_kernel(qt, "cpu") is select_kernel(qt, CPU) is not None
    assert select_kernel(qt, "meta") is None


def test_the_highest_priority_supporting_kernel_wins(monkeypatch):
    from lowbit.kernels import registry

    qt = quantize(torch.randn(64, 128), QuantSpec(bits=4, group_size=32))
    builtin = select_kernel(qt, "cpu")
    assert builtin is not None and builtin.priority == 10
    takes_all = {"supports": lambda qt, device: True}
    below = dummy_kernel(name="test_below", priority=0, **takes_all)
    above = dummy_kernel(name="test_above", priority=20, **takes_all)
    kernels = {**registry._KERNELS, below.name: below}
    monkeypatch.setattr(registry, "_KERNELS", kernels)
    assert select_kernel(qt, "cpu") is builtin  # registered later, but lower priority
    kernels[above.name] = above
    assert select_kernel(qt, "cpu") is above
    assert available_kernels()[0] == "test_above" and available_kernels()[-1] == "test_below"


