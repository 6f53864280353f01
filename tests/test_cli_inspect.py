"""``lowbit inspect``: what a saved directory holds, read without building a model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
import lowbit.io.checkpoint
import lowbit.io.describe
import lowbit.io.hf
from lowbit.cli import build_parser, main
from lowbit.io import read_manifest
from lowbit.io.describe import describe_checkpoint


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory):
    """Directories written by ``lowbit quantize``: int4 g32 (packed int4 kernel), int8 per
    channel (packed int8 kernel), and the best grid per layer (codebooks: the fallback)."""
    root = tmp_path_factory.mktemp("inspect")
    base = ["quantize", "--model", str(tiny_llama_dir)]
    runs = {
        "int4": ["--bits", "4", "--group-size", "32"],
        "int8": ["--bits", "8"],
        "best": [
            "--bits",
            "4",
            "--group-size",
            "32",
            "--grid",
            "best",
            "--exclude",
            "--quantize-tied",
        ],
    }
    for name, args in runs.items():
        assert main([*base, *args, "--out", str(root / name)]) == 0
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is built or loaded, or anything is unpickled."""

    def refuse(*args, **kwargs):
        raise AssertionError("inspect loaded a model or unpickled a file")

    monkeypatch.setattr(lowbit.io.hf, "load_pretrained", refuse)
    monkeypatch.setattr(lowbit.io.hf, "load_quantized", refuse)
    monkeypatch.setattr(lowbit.io.checkpoint, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def table_rows(stdout: str) -> dict[str, dict]:
    """The printed layer table, parsed: name -> shape, label, bits/w (text), bytes, kernel."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer ")) + 2
    rows = {}
    for line in lines[start:]:
        if line.startswith("total:"):
            break
        parts = line.split()
        rows[parts[0]] = {
            "shape": parts[1],
            "label": " ".join(parts[2:-3]),
            "bits": parts[-3],
            "bytes": int(parts[-2]),
            "kernel": parts[-1],
        }
    return rows


def expected_layer(directory, name: str, info: dict) -> tuple[int, float]:
    """(stored bytes, bits/weight) of a layer from the tensors file and the manifest alone."""
    state = load_file(str(directory / "model.safetensors"))
    parts = ("packed", "scale", "zero", "signs")
    stored = sum(
        state[key].numel() * state[key].element_size()
        for key in (f"{name}.{part}" for part in parts)
        if key in state
    )
    return stored, 8 * stored / (info["out_features"] * info["in_features"])


@pytest.mark.parametrize(
    "which", ["int4", "int8", "best"]
)
def test_table_matches_the_manifest(saved, capsys, no_model, which):
    directory = saved / which
    assert main(["inspect", str(directory)]) == 0
    stdout = capsys.readouterr().out
    manifest = read_manifest(directory)
    meta = manifest["metadata"]
    assert f"checkpoint: {directory} (model.safetensors, sha256 verified)" in stdout
    assert f"source model: {meta['source_model']}" in stdout
    rows = table_rows(stdout)
    assert list(rows) == list(manifest["layers"])
    for name, info in manifest["layers"].items():
        row = rows[name]
        stored, bits = expected_layer(directory, name, info)
        assert row["bytes"] == stored and row["bits"] == f"{bits:.3f}"
        assert row["shape"] == f"{info['out_features']}x{info['in_features']}"
        spec = lowbit.QuantSpec.from_dict(info["spec"])
        assert row["label"] == spec.label
        # float32 weights: float32-exact paths only, lowbit's kernel first.
        paths = [part.split(":")[0] for part in row["kernel"].split(",")]
        assert paths[0] == "cpu_native", row["kernel"]
        exact = {"cpu_native", "cpu_native_tiled", "dequantize"}
        assert set(paths) <= exact, row["kernel"]
        assert row["kernel"].endswith("+")
    if which == "best":
        assert "lm_head" in rows and {r["label"].split()[0] for r in rows.values()} != {"int4"}
    total = next(line for line in stdout.splitlines() if line.startswith("total:"))
    weights = sum(i["out_features"] * i["in_features"] for i in manifest["layers"].values())
    stored = sum(r["bytes"] for r in rows.values())
    avg = meta["report"]["avg_bits_per_weight"]
    assert f"{len(rows)} quantized layers, {weights} weights, {stored} bytes, " in total
    assert f"{avg:.3f} bits/weight" in total and 8 * stored / weights == pytest.approx(avg)


def test_json_holds_the_same_data(saved, tmp_path, capsys, no_model):
    out = tmp_path / "sub" / "inspect.json"
    assert main(["inspect", str(saved / "int4"), "--json", str(out)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"description written to {out}")
    data = json.loads(out.read_text())
    assert data.pop("lowbit") == "inspect"
    assert data == json.loads(json.dumps(describe_checkpoint(saved / "int4")))
    totals = data["totals"]
    assert totals["bits_per_weight"] == pytest.approx(4.625)
    assert totals["bytes"] == sum(layer["bytes"] for layer in data["layers"])
    assert data["specs"] == ["int4 g32 asym"] and data["exclude"] == ["lm_head"]
    assert main(["inspect", str(saved / "int8"), "--json", str(out)]) == 0  # ours: replaced
    assert json.loads(out.read_text())["layers"][0]["kernel"].startswith("cpu_native:1-")


def test_json_path_is_checked_first(saved, tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine.json"
    mine.write_text('{"mine": 1}')

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was read before --json was checked")

    monkeypatch.setattr(lowbit.io.describe, "verify", refuse)
    assert main(["inspect", str(saved / "int4"), "--json", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and "not written by lowbit" in err and "Traceback" not in err
    assert mine.read_text() == '{"mine": 1}'
    assert main(["inspect", str(saved / "int4"), "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def copy_of(saved, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(saved / "int4", target)
    return target


def corrupt_tensors(directory):
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_manifest(directory):
    path = directory / "lowbit.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def drop_a_tensor(directory):
    # A consistent file (its sha256 updated) that lacks one layer's zero points.
    path = directory / "model.safetensors"
    state = load_file(str(path))
    del state["model.layers.1.mlp.up_proj.zero"]
    save_file(state, str(path))
    manifest = json.loads((directory / "lowbit.json").read_text())
    manifest["sha256"] = lowbit.io.checkpoint._sha256(path)
    (directory / "lowbit.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "is not a directory"),
        ("no-manifest", "is not a lowbit checkpoint: it has no lowbit.json"),
        ("hf-model", "is not a lowbit checkpoint"),
        ("corrupted", "is corrupted: its sha256 does not match"),
        ("truncated-manifest", "lowbit.json"),
        ("no-tensors", "is missing"),
        ("missing-tensor", "'model.layers.1.mlp.up_proj.zero' is missing"),
    ],
)
def test_bad_directories_exit_2_without_traceback(
    saved, tiny_llama_dir, tmp_path, capsys, no_model, case, message
):
    directory = {"missing": tmp_path / "nope", "hf-model": tiny_llama_dir}.get(case)
    if directory is None:
        directory = copy_of(saved, tmp_path)
        if case == "no-manifest":
            (directory / "lowbit.json").unlink()
        elif case == "corrupted":
            corrupt_tensors(directory)
        elif case == "truncated-manifest":
            truncate_manifest(directory)
        elif case == "no-tensors":
            (directory / "model.safetensors").unlink()
        elif case == "missing-tensor":
            drop_a_tensor(directory)
    assert main(["inspect", str(directory)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("lowbit inspect: error: ")
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_help_documents_every_option():
    parser = build_parser()
    inspect_parser = parser._subparsers._group_actions[0].choices["inspect"]
    for action in inspect_parser._actions:
        assert action.help, f"{action.option_strings} has no help"
