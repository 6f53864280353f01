"""Dispatch by measured crossover: plans from a table, the accuracy rule for float32 inputs,
fallbacks for formats and files the table does not cover, and the table's measurement."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit import QuantLinear, QuantSpec, quantize
from lowbit.cli import main
from lowbit.kernels import DEQUANTIZE, dispatch, get_kernel, tuning
from lowbit.kernels.dispatch import DEQUANTIZE_FP32, Plan, format_key, plan_for

CPU = torch.device("cpu")
TOKENS = [1, 4, 32, 512]


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Point dispatch at a table written by the test; returns a function that writes it."""
    path = tmp_path / "table.json"
    monkeypatch.setenv("LOWBIT_DISPATCH_TABLE", str(path))
    dispatch.forget_tables()

    def write(rankings, tokens=TOKENS, **extra):
        data = {"version": dispatch.TABLE_VERSION, "tokens": tokens, "rankings": rankings, **extra}
        path.write_text(json.dumps(data))
        dispatch.forget_tables()
        return path

    yield write
    dispatch.forget_tables()


def int4():
    return quantize(torch.randn(64, 128), QuantSpec(bits=4, group_size=64))


def test_plan_paths_and_summary():
    plan = Plan(((4, "cpu_native"), (32, "cpu_int4pack"), (None, DEQUANTIZE)))
    assert [plan.path(n) for n in (1, 4, 5, 32, 33, 10**6)] == [
        "cpu_native", "cpu_native", "cpu_int4pack", "cpu_int4pack", DEQUANTIZE, DEQUANTIZE
    ]
    assert plan.summary() == "cpu_native:1-4,cpu_int4pack:5-32,dequantize:33+"
    assert Plan(((None, DEQUANTIZE),)).summary() == DEQUANTIZE
    assert Plan(((1, "cpu_native"), (None, DEQUANTIZE))).summary() == (
        "cpu_native:1,dequantize:2+"
    )


def test_format_keys():
    assert format_key(int4()) == "int4"
    nf4 = quantize(torch.randn(8, 64), QuantSpec(bits=4, grid="nf4", group_size=64))
    assert format_key(nf4) == "codebook4"
    assert format_key(quantize(torch.randn(8, 64), QuantSpec(bits=8))) == "int8"


def test_table_rankings_with_the_float32_accuracy_rule(table):
    ranked = ["cpu_int4pack", "cpu_native", DEQUANTIZE]
    table({
        "float32": {"int4": [ranked, ranked, [DEQUANTIZE, "cpu_native"], [DEQUANTIZE]]},
        "bfloat16": {"int4": [ranked, ranked, [DEQUANTIZE_FP32, DEQUANTIZE], [DEQUANTIZE_FP32]]},
    })
    qt = int4()
    # float32 inputs: the bf16 packed kernel is skipped unless the layer allows it.
    assert plan_for(qt, CPU, torch.float32).summary() == "cpu_native:1-4,dequantize:5+"
    assert plan_for(qt, CPU, torch.float32, allow_bf16=True).summary() == (
        "cpu_int4pack:1-4,dequantize:5+"
    )
    assert plan_for(qt, CPU, torch.bfloat16).summary() == "cpu_int4pack:1-4,dequantize_fp32:5+"
    # float16 inputs use the bfloat16 rankings when the table has none of their own, and
    # like float32 and float64 ones no bfloat16 kernel unless allowed.
    assert plan_for(qt, CPU, torch.float16).summary() == "cpu_native:1-4,dequantize_fp32:5+"
    assert plan_for(qt, CPU, torch.float16, allow_bf16=True).summary() == (
        "cpu_int4pack:1-4,dequantize_fp32:5+"
    )
    assert "cpu_int4pack" not in plan_for(qt, CPU, torch.float64).summary()


def test_unusable_and_unknown_paths_are_skipped(table):
    table({"float32": {"int4": [["not_a_kernel", "cpu_int4pack", DEQUANTIZE_FP32]] * 4}})
    # No usable path in the ranking (dequantize_fp32 means nothing for float32): dequantize,
    # after the kernels the table never measured (cpu_native), up to their max_tokens.
    assert plan_for(int4(), CPU, torch.float32).summary() == "cpu_native:1-4,dequantize:5+"
    # The packed kernels do not take a group of 16 even when allowed: the same.
    qt = quantize(torch.randn(64, 128), QuantSpec(bits=4, group_size=16))
    assert plan_for(qt, CPU, torch.float32, allow_bf16=True).summary() == (
        "cpu_native:1-4,dequantize:5+"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOWBIT_NATIVE", "0")
        assert plan_for(int4(), CPU, torch.float32).summary() == DEQUANTIZE


def test_formats_the_table_lacks_follow_the_registry(table):
    table({"float32": {"int8": [[DEQUANTIZE]] * 4}})
    kernel = get_kernel("cpu_native")
    assert plan_for(int4(), CPU, torch.float32).steps == (
        (kernel.max_tokens, "cpu_native"), (None, DEQUANTIZE)
    )


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps({"version": 99, "tokens": [1], "rankings": {}}),
        json.dumps([1, 2]),
        json.dumps({"version": 1, "tokens": [1, 2], "rankings": {"float32": {"int4": [["x"]]}}}),
        json.dumps({"version": 1, "tokens": "1", "rankings": {"float32": {"int4": "x"}}}),
    ],
    ids=["truncated", "other-version", "not-an-object", "length-mismatch", "wrong-types"],
)
def test_a_bad_table_is_ignored(table, text, monkeypatch):
    path = table({})
    path.write_text(text)
    dispatch.forget_tables()
    # Skipped for the next table in line (this machine's, else the shipped one).
    got = plan_for(int4(), CPU, torch.float32)
    monkeypatch.delenv("LOWBIT_DISPATCH_TABLE")
    dispatch.forget_tables()
    assert got == plan_for(int4(), CPU, torch.float32)


def test_the_shipped_table_is_complete():
    shipped = json.loads((dispatch._SHIPPED / "dispatch_cpu.json").read_text())
    assert shipped["version"] == dispatch.TABLE_VERSION and shipped["lowbit"] == "dispatch"
    for dtype in ("float32", "bfloat16"):
        assert set(shipped["rankings"][dtype]) == set(tuning.FORMATS)
        for rankings in shipped["rankings"][dtype].values():
            assert len(rankings) == len(shipped["tokens"])


def test_layers_follow_the_table(table):
    table({"float32": {"int4": [["cpu_native"], ["cpu_native"], [DEQUANTIZE], [DEQUANTIZE]]}})
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 64), QuantSpec(bits=4, group_size=64))
    assert layer.plan().summary() == "cpu_native:1-4,dequantize:5+"
    assert layer.selected_kernel().name == "cpu_native"
    dequantized = QuantLinear.from_linear(
        torch.nn.Linear(128, 64), QuantSpec(bits=4, group_size=64), kernel="dequantize"
    )
    assert dequantized.plan().summary() == DEQUANTIZE


def test_measure_writes_a_table_dispatch_reads(table):
    formats = {"int4": QuantSpec(bits=4, group_size=64), "codebook4": QuantSpec(bits=4, grid="nf4")}
    data = tuning.measure(formats, tokens=(1, 64), shape=(64, 128), repeats=1)
    assert data["tokens"] == [1, 64] and data["shape"] == [64, 128]
    for dtype in ("float32", "bfloat16"):
        for key in formats:
            rankings = data["rankings"][dtype][key]
            timings = data["timings_ms"][dtype][key]
            assert len(rankings) == len(timings) == 2
            for ranked, ms in zip(rankings, timings, strict=True):
                assert set(ms) <= set(ranked) and DEQUANTIZE in ms
                assert all(value > 0 for value in ms.values())
    assert DEQUANTIZE_FP32 in data["timings_ms"]["bfloat16"]["int4"][0]
    assert DEQUANTIZE_FP32 not in data["timings_ms"]["float32"]["int4"][0]
    with pytest.raises(ValueError, match="has key"):
        tuning.measure({"int8": QuantSpec(bits=4)}, tokens=(1,), shape=(16, 64), repeats=1)


def test_cli_tune_refuses_files_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "data"}')
    assert main(["tune", "--out", str(mine)]) == 2
    assert "not written by lowbit" in capsys.readouterr().err
    assert mine.read_text() == '{"my": "data"}'
    assert main(["tune", "--out", str(tmp_path / "t.json"), "--repeats", "0"]) == 2
    assert not (tmp_path / "t.json").exists()


def test_a_kernel_newer_than_the_table_outranking_it_serves_its_range(table, monkeypatch):
    from lowbit.kernels import Kernel, registry

    table({"float32": {"int4": [["cpu_native"], ["cpu_native"], [DEQUANTIZE], [DEQUANTIZE]]}})
    fast = Kernel(
        "test_newer",
        lambda qt, device: True,
        lambda qt: {},
        lambda x, prepared, bias: x,
        max_tokens=8,
        priority=50,
        fp32_exact=True,
    )
    monkeypatch.setattr(registry, "_KERNELS", {**registry._KERNELS, fast.name: fast})
    assert plan_for(int4(), CPU, torch.float32).summary() == "test_newer:1-8,dequantize:9+"
    slow = Kernel(**{**fast.__dict__, "name": "test_lower", "priority": 0})
    monkeypatch.setattr(registry, "_KERNELS", {**registry._KERNELS, slow.name: slow})
    del registry._KERNELS["test_newer"]
    assert plan_for(int4(), CPU, torch.float32).summary() == "cpu_native:1-4,dequantize:5+"


def test_a_newer_kernel_covering_every_bucket_keeps_the_last_row(table, monkeypatch):
    from lowbit.kernels import Kernel, registry

    table({"float32": {"int4": [["cpu_native"]] * 3 + [["cpu_native_tiled"]]}})
    wide = Kernel(
        "test_wide", lambda qt, device: True, lambda qt: {}, lambda x, p, b: x,
        max_tokens=10_000, priority=50, fp32_exact=True,
    )
    monkeypatch.setattr(registry, "_KERNELS", {**registry._KERNELS, wide.name: wide})
    assert plan_for(int4(), CPU, torch.float32).summary() == (
        "test_wide:1-10000,cpu_native_tiled:10001+"
    )


def test_layers_plan_again_after_a_registration_or_a_new_table(table, monkeypatch):
    from lowbit.kernels import Kernel, registry

    layer = QuantLinear.from_linear(torch.nn.Linear(128, 64), QuantSpec(bits=4, group_size=64))
    table({"float32": {"int4": [["cpu_native"], ["cpu_native"], [DEQUANTIZE], [DEQUANTIZE]]}})
    assert layer.plan().summary() == "cpu_native:1-4,dequantize:5+"
    # forget_tables: layers plan again (cpu_native measured, slower everywhere)
    table({"float32": {"int4": [[DEQUANTIZE, "cpu_native"]] * 4}})
    assert layer.plan().summary() == DEQUANTIZE
    newer = Kernel(
        "test_registered_later", lambda qt, device: True, lambda qt: {}, lambda x, p, b: x,
        max_tokens=2, priority=50, fp32_exact=True,
    )
    monkeypatch.setattr(registry, "_KERNELS", dict(registry._KERNELS))
    registry.register_kernel(newer)
    assert layer.plan().summary() == "test_registered_later:1-2,dequantize:3+"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"formats": {}}, ValueError, "formats must be a non-empty dict"),
        ({"formats": {"int4": "int4 g64"}}, TypeError, "QuantSpec objects"),
        ({"tokens": ()}, ValueError, "tokens must be ascending"),
        ({"tokens": (4, 1)}, ValueError, "tokens must be ascending"),
        ({"tokens": (0, 1)}, ValueError, "tokens must be ascending"),
        ({"shape": (16,)}, ValueError, "shape must be two positive ints"),
        ({"shape": (16, 0)}, ValueError, "shape must be two positive ints"),
        ({"repeats": 0}, ValueError, "repeats must be a positive int"),
    ],
)
def test_measure_refuses_bad_arguments(kwargs, error, match):
    arguments = {"formats": {"int4": QuantSpec(bits=4, group_size=64)}, "tokens": (1,),
                 "shape": (16, 64), "repeats": 1, **kwargs}
    with pytest.raises(error, match=match):
        tuning.measure(**arguments)
