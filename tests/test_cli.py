"""The ``lowbit`` command line: ``quantize`` and ``eval`` on the tiny Llama checkpoint."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from lowbit import QuantLinear, QuantSpec, quantize_model
from lowbit.cli import main
from lowbit.eval import eval_tokens
from lowbit.io import read_manifest
from lowbit.io.hf import load_pretrained, load_quantized
from lowbit.model import model_bytes

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEARS = [
    f"model.layers.{i}.{p}.{n}"
    for i in range(2)
    for p, ns in (("self_attn", ATTN), ("mlp", MLP))
    for n in ns
]


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def int4_dir(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "int4"
    code, _ = run(
        [
            "quantize",
            "--model",
            str(tiny_llama_dir),
            "--bits",
            "4",
            "--group-size",
            "32",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_quantize_writes_a_loadable_directory(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tiny_llama_dir), "--bits", "4", "--group-size", "32"]
    assert main([*argv, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"model: {tiny_llama_dir}" in stdout
    assert "spec: int4 g32 asym (scales float16); kept float: ['lm_head']" in stdout
    assert "SQNR dB" in stdout and "(8 of 15 layers shown: largest error first)" in stdout
    assert "quantized 14 layers, kept 1 in full precision: lm_head (excluded)" in stdout
    assert stdout.rstrip().endswith(f"saved to {out}")
    table = [line for line in stdout.splitlines() if "int4 g32 asym  " in line]
    assert len(table) == 8  # the 8 worst layers
    assert all(line.split()[0] in LINEARS for line in table)

    manifest = read_manifest(out)
    assert sorted(manifest["layers"]) == sorted(LINEARS)
    spec = QuantSpec(bits=4, group_size=32)
    assert {QuantSpec.from_dict(i["spec"]) for i in manifest["layers"].values()} == {spec}
    meta = manifest["metadata"]
    assert meta["source_model"] == str(tiny_llama_dir) and meta["exclude"] == ["lm_head"]
    assert meta["specs"] == [spec.to_dict()] and meta["report"]["avg_bits_per_weight"] == 4.625

    loaded, tokenizer = load_quantized(out)
    expected, _ = load_pretrained(tiny_llama_dir)
    quantize_model(expected, spec, exclude=["lm_head"], progress=False)
    ids = eval_tokens(tokenizer, seq_len=24, windows=1)
    with torch.inference_mode():
        a, b = expected(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.isfinite(b).all() and torch.equal(a, b)


def quantized_layers(directory) -> set[str]:
    return set(read_manifest(directory)["layers"])


def test_exclude_patterns(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tiny_llama_dir), "--bits", "8", "--out", str(out)]
    assert main([*argv, "--exclude", "*.mlp.*", "re:.*\\.[kv]_proj"]) == 0
    assert "kept float: ['*.mlp.*', 're:.*\\\\.[kv]_proj']" in capsys.readouterr().out
    expected = {f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "o_proj")}
    # The patterns replace the default exclusion; the tied lm_head is still kept float.
    assert quantized_layers(out) == expected

    assert main([*argv, "--exclude"]) == 0  # no pattern: every layer but the tied head
    assert "kept float: none" in capsys.readouterr().out
    assert quantized_layers(out) == set(LINEARS)
    assert main([*argv, "--exclude", "--quantize-tied"]) == 0  # the head too
    assert quantized_layers(out) == set(LINEARS) | {"lm_head"}
    loaded, _ = load_quantized(out)
    assert isinstance(loaded.lm_head, QuantLinear)
    assert not isinstance(loaded.model.embed_tokens, QuantLinear)
    with torch.inference_mode():
        assert torch.isfinite(loaded(input_ids=torch.arange(10)[None]).logits).all()


def test_json_report_totals(tiny_llama_dir, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    argv = ["quantize", "--model", str(tiny_llama_dir), "--bits", "4", "--group-size", "32"]
    assert main([*argv, "--table", "--json", str(report_path)]) == 0
    stdout = capsys.readouterr().out
    assert "saved to" not in stdout and sorted(p.name for p in tmp_path.iterdir()) == [
        "report.json"
    ]
    assert "lm_head" in stdout and "kept: excluded" in stdout
    assert all(name in stdout for name in LINEARS)  # --table: every layer

    report = json.loads(report_path.read_text())
    assert report["lowbit"] == "quantize-report"
    rows, totals = report["layers"], report["totals"]
    model, _ = load_pretrained(tiny_llama_dir)
    weights = {
        name: module.weight.numel() for name, module in model.named_modules() if name in LINEARS
    }
    assert [r["name"] for r in rows] == [*LINEARS, "lm_head"]
    assert totals["layers_quantized"] == 14 and totals["layers_skipped"] == 1
    assert totals["parameters"] == sum(p.numel() for p in model.parameters())
    assert totals["bytes_before"] == model_bytes(model)
    # int4, one fp16 scale and one 4-bit zero point per 32 weights: 4 + 16/32 + 4/32 bits.
    assert totals["avg_bits_per_weight"] == 4.625
    saved_bytes = sum(weights.values()) * (4 - 4.625 / 8)  # fp32 weights -> 4.625 bits
    assert totals["bytes_before"] - totals["bytes_after"] == saved_bytes
    quantized = [r for r in rows if r["skipped"] is None]
    assert all(0 < r["rel_error"] < 0.2 and r["sqnr_db"] > 10 for r in quantized)
    assert totals["mean_rel_error"] == pytest.approx(sum(r["rel_error"] for r in quantized) / 14)
    assert rows[-1]["skipped"] == "excluded" and rows[-1]["bits_per_weight"] == 32.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "1"], "bits=1 is out of range"),
        (["--bits", "9"], "bits must be in 1..8, got 9"),
        (["--bits", "0"], "bits must be in 1..8, got 0"),
        (["--group-size", "0"], "group_size must be in 1.."),
        (["--granularity", "channel", "--group-size", "32"], "conflicts with granularity"),
        (["--model", "MISSING"], "MISSING"),
    ],
)
def test_quantize_bad_arguments(tiny_llama_dir, tmp_path, capsys, args, message):
    args = [str(tmp_path / "no-model") if a == "MISSING" else a for a in args]
    out = tmp_path / "out"
    argv = ["quantize", "--model", str(tiny_llama_dir), *args, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lowbit quantize: error:" in err and message.replace("MISSING", "no-model") in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["quantize", "--bits", "four"])
    assert info.value.code == 2
    assert "invalid int value: 'four'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def independent_perplexity(model, tokens) -> float:
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in tokens]
    return math.exp(sum(losses) / len(losses))


def test_eval_table(int4_dir, tiny_llama_dir, tmp_path, capsys):
    rows_path = tmp_path / "rows.json"
    argv = [
        "eval",
        str(int4_dir),
        "--model",
        str(tiny_llama_dir),
        "--windows",
        "2",
        "--seq-len",
        "32",
    ]
    assert main([*argv, "--json", str(rows_path)]) == 0
    stdout = capsys.readouterr().out
    assert "WikiText-2 test, first 64 tokens: 2 windows x 32" in stdout
    written = json.loads(rows_path.read_text())
    assert written["lowbit"] == "eval"
    rows = written["rows"]
    assert [r["model"] for r in rows] == [f"float32 {tiny_llama_dir.name}", str(int4_dir)]
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in rows)

    base, tokenizer = load_pretrained(tiny_llama_dir)
    loaded, _ = load_quantized(int4_dir)
    tokens = eval_tokens(tokenizer, seq_len=32, windows=2)
    assert rows[0]["perplexity"] == pytest.approx(independent_perplexity(base, tokens), rel=1e-5)
    assert rows[1]["perplexity"] == pytest.approx(independent_perplexity(loaded, tokens), rel=1e-5)
    assert rows[0]["bytes"] == model_bytes(base) and rows[1]["bytes"] == model_bytes(loaded)
    assert rows[1]["bits_per_weight"] == 4.625 and rows[0]["bits_per_weight"] is None

    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header].split()[-6:] == ["ppl", "Δppl", "quant", "s", "eval", "s"]
    table = lines[header + 2 : header + 4]
    assert table[0].startswith(f"float32 {tiny_llama_dir.name} ")
    assert table[1].startswith(f"{int4_dir} ")
    for line, row in zip(table, rows, strict=True):
        assert f"  {row['perplexity']:.3f}  " in line
    delta = rows[1]["perplexity"] - rows[0]["perplexity"]
    assert f"{delta:+.3f}" in table[1] and " 4.625 " in table[1]
    ratio = rows[0]["bytes"] / rows[1]["bytes"]
    assert ratio > 3 and f"{ratio:.2f}x" in table[1]


def test_eval_defaults_to_the_source_model(int4_dir, tiny_llama_dir, capsys):
    assert main(["eval", str(int4_dir), "--windows", "1", "--seq-len", "16"]) == 0
    stdout = capsys.readouterr().out
    assert f"float32 {tiny_llama_dir.name} " in stdout and f"{int4_dir} " in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--windows", "0"], "windows >= 1"),
        (["--seq-len", "1"], "--seq-len must be >= 2"),
        (["--seq-len", "100000"], "exceeds"),
    ],
)
def test_eval_bad_sizes(int4_dir, tiny_llama_dir, capsys, args, message):
    assert main(["eval", str(int4_dir), "--model", str(tiny_llama_dir), *args]) == 2
    err = capsys.readouterr().err
    assert "lowbit eval: error:" in err and message in err


def test_eval_of_a_directory_that_is_not_quantized(tiny_llama_dir, capsys):
    assert main(["eval", str(tiny_llama_dir), "--model", str(tiny_llama_dir)]) == 2
    err = capsys.readouterr().err
    assert "lowbit eval: error:" in err and "lowbit.json" in err


def test_out_may_not_overwrite_the_source_model(tiny_llama_dir, capsys):
    before = sorted(p.name for p in tiny_llama_dir.iterdir())
    code = main(
        ["quantize", "--model", str(tiny_llama_dir), "--bits", "8", "--out", str(tiny_llama_dir)]
    )
    assert code == 2
    assert "source model" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == before


def test_codebook_grid_and_best_grid(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "nf4"
    argv = ["quantize", "--model", str(tiny_llama_dir), "--bits", "4", "--group-size", "32"]
    assert main([*argv, "--grid", "nf4", "--out", str(out)]) == 0
    layers = read_manifest(out)["layers"]
    assert {info["spec"]["grid"] for info in layers.values()} == {"nf4"}
    assert all(info["spec"]["symmetric"] for info in layers.values())  # codebooks imply it
    capsys.readouterr()

    best = tmp_path / "best"
    assert main([*argv, "--grid", "best", "--out", str(best)]) == 0
    printed, warned = capsys.readouterr()
    assert "best per layer of int4 g32 asym, " in printed and "nf4 g32 sym" in printed
    chosen = {info["spec"]["grid"] for info in read_manifest(best)["layers"].values()}
    assert chosen <= {
        "int",
        "nf4",
        "fp4",
        "gaussian",
        "logistic",
        "laplace",
        "gumbel",
        "exponential",
    } | {
        g + "-quantile"
        for g in ("gaussian", "logistic", "laplace", "gumbel", "exponential", "cauchy")
    }
    # Candidates differ in size (int4 with zero points is larger): the report says so.
    assert "differ in stored size" in warned and "size_adjusted" in warned
    loaded, _ = load_quantized(best)
    with torch.inference_mode():
        assert torch.isfinite(loaded(input_ids=torch.arange(10)[None]).logits).all()

    # Compared at equal size, the 4.5 bits/weight codebooks are not beaten by size alone.
    even = tmp_path / "even"
    assert main([*argv, "--grid", "best", "--choose", "size_adjusted", "--out", str(even)]) == 0
    kept = [info["spec"] for info in read_manifest(even)["layers"].values()]
    assert sum(spec["grid"] != "int" for spec in kept) >= sum(
        info["spec"]["grid"] != "int" for info in read_manifest(best)["layers"].values()
    )


def test_bad_grid_arguments_fail_before_loading(tiny_llama_dir, tmp_path, capsys):
    argv = ["quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "x")]
    assert main([*argv, "--grid", "nf4", "--bits", "3"]) == 2
    assert "bits=3 is out of range for grid 'nf4'" in capsys.readouterr().err
    assert main([*argv, "--grid", "nf5"]) == 2
    assert "unknown grid 'nf5'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "fit,options", [("mse", []), ("hqq", ["iterations=5"]), ("entropy", ["source=residual"])]
)
def test_fit_options_and_calibration(tiny_llama_dir, tmp_path, capsys, fit, options):
    out = tmp_path / fit
    argv = ["quantize", "--model", str(tiny_llama_dir), "--bits", "3", "--group-size", "32"]
    argv += ["--fit", fit, "--calibrate", "2", "--zero-point", "float", "--out", str(out)]
    for option in options:
        argv += ["--fit-option", option]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "calibrating on 2 x 512 tokens of Tiny Shakespeare" in printed
    assert "codes' entropy" in printed and "H bits" in printed
    specs = [info["spec"] for info in read_manifest(out)["layers"].values()]
    assert {s["fit"] for s in specs} == {fit}
    if options:
        name, value = options[0].split("=")
        assert all(str(s["fit_options"][name]) == value for s in specs)
    loaded, _ = load_quantized(out)
    with torch.inference_mode():
        assert torch.isfinite(loaded(input_ids=torch.arange(10)[None]).logits).all()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--fit", "nope"], "unknown fit 'nope'"),
        (["--fit", "mse", "--fit-option", "bogus=1"], "has no option(s) ['bogus']"),
        (["--fit", "mse", "--fit-option", "candidates"], "expects NAME=VALUE"),
        (["--fit", "mse", "--fit-option", "candidates=x"], "must be int"),
        (["--calibrate", "2"], "needs a searching fit"),
        (["--fit", "mse", "--calibrate", "-1"], "--calibrate must be >= 0"),
    ],
)
def test_bad_fit_arguments(tiny_llama_dir, tmp_path, capsys, args, message):
    out = tmp_path / "x"
    argv = ["quantize", "--model", str(tiny_llama_dir), *args, "--out", str(out)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
