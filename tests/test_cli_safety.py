"""The command line never loses a user's file, checks every input and output before the long
work, and refuses models that would be silently wrong (reproductions from a new user's trial)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import lowbit.eval
import lowbit.io.hf
from lowbit.cli import main
from lowbit.io import read_manifest

QUANTIZE = ["quantize", "--bits", "4", "--group-size", "32"]


def quantize(model_dir, *args) -> list[str]:
    return [*QUANTIZE, "--model", str(model_dir), *args]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the model gets loaded (checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(lowbit.io.hf, "load_pretrained", refuse)


@pytest.fixture
def no_evaluation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("evaluation started before every directory was checked")

    monkeypatch.setattr(lowbit.eval, "perplexity", refuse)


@pytest.fixture(scope="module")
def quantized_dir(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    assert main(quantize(tiny_llama_dir, "--out", str(out))) == 0
    return out


# Data loss


def test_a_second_run_keeps_the_users_notes_and_the_report(tiny_llama_dir, tmp_path, capsys):
    r1 = tmp_path / "r1"
    assert main(quantize(tiny_llama_dir, "--bits", "8", "--out", str(r1))) == 0
    (r1 / "NOTES.md").write_text("notes")
    argv = quantize(tiny_llama_dir, "--out", str(r1), "--json", str(r1 / "report.json"))
    assert main(argv) == 0
    assert (r1 / "NOTES.md").read_text() == "notes"
    report = json.loads((r1 / "report.json").read_text())
    assert report["lowbit"] == "quantize-report" and report["totals"]["layers_quantized"] == 14
    assert main(argv) == 0  # again: the report is lowbit's own, so it may be replaced
    assert (r1 / "NOTES.md").read_text() == "notes" and (r1 / "report.json").is_file()
    assert read_manifest(r1)["layers"]


def test_json_into_a_folder_that_does_not_exist_yet(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "r1"
    argv = quantize(tiny_llama_dir, "--out", str(out), "--json", str(out / "rep" / "r.json"))
    assert main(argv) == 0
    assert read_manifest(out)["layers"]
    assert json.loads((out / "rep" / "r.json").read_text())["lowbit"] == "quantize-report"


@pytest.mark.parametrize("case", ["users-file", "directory", "under-a-file"])
def test_bad_json_path_fails_before_loading(
    tiny_llama_dir, tmp_path, capsys, no_loading, case
):
    mine = tmp_path / "mine.json"
    mine.write_text('{"mine": 1}')
    path = {"users-file": mine, "directory": tmp_path, "under-a-file": mine / "r.json"}[case]
    assert main(quantize(tiny_llama_dir, "--json", str(path), "--out", str(tmp_path / "o"))) == 2
    assert "--json" in capsys.readouterr().err
    assert mine.read_text() == '{"mine": 1}' and not (tmp_path / "o").exists()


def test_out_under_a_file_fails_before_loading(tiny_llama_dir, tmp_path, capsys, no_loading):
    (tmp_path / "f").write_text("x")
    assert main(quantize(tiny_llama_dir, "--out", str(tmp_path / "f" / "out"))) == 2
    assert "not a directory" in capsys.readouterr().err


def test_out_into_a_foreign_directory_fails_before_loading(
    tiny_llama_dir, tmp_path, capsys, no_loading
):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "a.txt").write_text("a")
    assert main(quantize(tiny_llama_dir, "--out", str(tmp_path / "theirs"))) == 2
    assert "not a lowbit checkpoint" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["a.txt"]


# Models that would be silently wrong


def test_a_lowbit_checkpoint_as_model_is_refused(quantized_dir, tiny_llama_dir, tmp_path, capsys):
    assert main(quantize(quantized_dir, "--out", str(tmp_path / "again"))) == 2
    err = capsys.readouterr().err
    assert "already quantized" in err and str(tiny_llama_dir) in err
    assert not (tmp_path / "again").exists()


def copy_model(source, target):
    shutil.copytree(source, target)
    return target


def test_weights_missing_from_the_checkpoint_are_refused(tiny_llama_dir, tmp_path, capsys):
    model = copy_model(tiny_llama_dir, tmp_path / "m")
    state = load_file(model / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    assert main(quantize(model, "--out", str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in err and "would be random" in err
    assert not (tmp_path / "o").exists()


def test_truncated_weights_are_a_clear_error(tiny_llama_dir, tmp_path, capsys):
    model = copy_model(tiny_llama_dir, tmp_path / "m")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(quantize(model)) == 2
    err = capsys.readouterr().err
    assert "cannot load the weights" in err and "Traceback" not in err


def test_pickle_weights_are_refused_unread(tiny_llama_dir, tmp_path, capsys):
    model = copy_model(tiny_llama_dir, tmp_path / "m")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert main(quantize(model)) == 2
    assert "pickle" in capsys.readouterr().err


def test_a_model_without_tokenizer_quantizes_and_saves(tiny_llama_dir, tmp_path, capsys):
    model = copy_model(tiny_llama_dir, tmp_path / "m")
    for path in model.iterdir():
        if "token" in path.name:
            path.unlink()
    out = tmp_path / "o"
    assert main(quantize(model, "--out", str(out))) == 0
    assert read_manifest(out)["layers"]
    assert main(quantize(model, "--fit", "mse", "--calibrate", "1")) == 2
    assert "tokenizer" in capsys.readouterr().err


# Eval checks every directory first


@pytest.fixture(scope="module")
def other_model_dir(tiny_llama_dir, tmp_path_factory):
    """Another tiny Llama (wider MLP) with the same tokenizer, quantized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("other")
    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.intermediate_size = 192
    LlamaForCausalLM(config).save_pretrained(root / "fp")
    for path in tiny_llama_dir.iterdir():
        if "token" in path.name:
            shutil.copy(path, root / "fp" / path.name)
    assert main(quantize(root / "fp", "--out", str(root / "q"))) == 0
    return root / "q"


def eval_argv(*dirs, model=None):
    argv = ["eval", *map(str, dirs), "--windows", "1", "--seq-len", "16"]
    return [*argv, "--model", str(model)] if model else argv


def test_eval_of_another_models_checkpoint_fails_first(
    quantized_dir, other_model_dir, tiny_llama_dir, capsys, no_evaluation
):
    assert main(eval_argv(quantized_dir, other_model_dir, model=tiny_llama_dir)) == 2
    captured = capsys.readouterr()
    assert "intermediate_size" in captured.err and str(other_model_dir) in captured.err
    assert "WikiText-2" not in captured.out


def test_eval_with_another_tokenizer_fails_first(
    quantized_dir, tiny_llama_dir, tmp_path, capsys, no_evaluation
):
    from tokenizers import Tokenizer

    copy = copy_model(quantized_dir, tmp_path / "q")
    tokenizer = Tokenizer.from_file(str(copy / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    reversed_vocab = {token: len(vocab) - 1 - i for token, i in vocab.items()}
    spec = json.loads((copy / "tokenizer.json").read_text())
    spec["model"]["vocab"] = reversed_vocab
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    assert main(eval_argv(quantized_dir, copy, model=tiny_llama_dir)) == 2
    assert "tokenizer splits the evaluation text differently" in capsys.readouterr().err


def test_eval_of_an_encoder_fails_first(quantized_dir, tiny_llama_dir, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    import lowbit

    encoder = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    lowbit.quantize_model(encoder, lowbit.QuantSpec(bits=8), progress=False)
    lowbit.io.hf.save_quantized(encoder, None, tmp_path / "enc")
    assert main(eval_argv(quantized_dir, tmp_path / "enc", model=tiny_llama_dir)) == 2
    assert "not a causal language model" in capsys.readouterr().err


def test_eval_of_a_folder_saved_without_config_fails_first(
    quantized_dir, tiny_llama_dir, tmp_path, capsys, no_evaluation
):
    import lowbit

    model, _ = lowbit.io.hf.load_quantized(quantized_dir)
    lowbit.save(model, tmp_path / "bare")
    assert main(eval_argv(quantized_dir, tmp_path / "bare", model=tiny_llama_dir)) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_eval_of_a_corrupted_checkpoint_fails_first(
    quantized_dir, tiny_llama_dir, tmp_path, capsys, no_evaluation
):
    copy = copy_model(quantized_dir, tmp_path / "q")
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert main(eval_argv(quantized_dir, copy, model=tiny_llama_dir)) == 2
    assert "corrupted" in capsys.readouterr().err


def test_eval_prints_each_row_and_keeps_json_current(quantized_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "rows.json"
    code = subprocess.run(
        [sys.executable, "-m", "lowbit", *eval_argv(quantized_dir, model=tiny_llama_dir)]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        env={"LOWBIT_COMPILE": "0", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert code.returncode == 0, code.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["perplexity"] > 1 for r in rows)
    assert f"{quantized_dir} " in code.stdout


# Arguments that conflict or are malformed, caught before loading


@pytest.mark.parametrize(
    "args,message",
    [
        (["--exclude", "re:["], "re:["),
        (["--fit", "mse", "--calibrate", "2", "--rotate"], "--rotate"),
        (["--group-size", "10000000000000000000000"], "group_size"),
        (["--symmetric", "--zero-point", "float"], "zero_point='float'"),
        (["--grid", "nf4", "--symmetric", "--zero-point", "float"], "zero_point='float'"),
        (["--bits", "3", "--grid", "nf4"], "'nf4'"),
    ],
)
def test_bad_arguments_fail_before_loading(
    tiny_llama_dir, tmp_path, capsys, no_loading, args, message
):
    assert main(quantize(tiny_llama_dir, *args, "--out", str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_python_dash_m_lowbit():
    done = subprocess.run(
        [sys.executable, "-m", "lowbit", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "quantize" in done.stdout and "eval" in done.stdout


def test_help_names_the_encoder_and_documents_every_option():
    from lowbit.cli import build_parser

    parser = build_parser()
    quantize_parser = parser._subparsers._group_actions[0].choices["quantize"]
    assert "all-minilm-l6-v2" in "".join(quantize_parser.format_help().split())
    for action in quantize_parser._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_default_exclude_does_not_warn_on_an_encoder(tmp_path, capsys):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    model_dir = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(model_dir)
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"]))
    BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    assert main(["quantize", "--model", str(model_dir), "--bits", "8"]) == 0
    assert "matched no layer" not in capsys.readouterr().err
    assert main(["quantize", "--model", str(model_dir), "--bits", "8", "--exclude", "nope"]) == 0
    assert "'nope' matched no layer" in capsys.readouterr().err




def _bad_fit_options() -> list[tuple[str, str, str]]:
    """(fit, option, value text) outside each declared option of every registered fit."""
    from lowbit.fit import available_fits, get_fit_info

    cases = []
    for fit in available_fits():
        for name, option in get_fit_info(fit).options.items():
            if option.kind is bool or option.choices or option.kind is str:
                value = "1" if option.kind is str else '"yes"'  # wrong type / not a choice
            elif option.low is not None:
                value = str(option.low if option.low_open else option.low - 1)
            else:
                value = str(option.high if option.high_open else option.high + 1)
            cases.append((fit, name, value))
    return cases


@pytest.mark.parametrize("fit,name,value", _bad_fit_options())
def test_every_bad_fit_option_fails_before_loading(
    tiny_llama_dir, tmp_path, capsys, no_loading, fit, name, value
):
    # Checked against the fit's declarations (no trial quantization), before the model loads.
    args = ["--fit", fit, "--fit-option", f"{name}={value}", "--out", str(tmp_path / "o")]
    if fit == "absmax":
        args.append("--symmetric")
    assert main(quantize(tiny_llama_dir, *args)) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_fit_and_grid_mismatch_and_calibration_fail_before_loading(
    tiny_llama_dir, tmp_path, capsys, no_loading
):
    from lowbit.fit import available_fits, fit_uses_importance

    out = str(tmp_path / "o")
    args = ["--fit", "absmax", "--grid", "exponential", "--out", out]
    assert main(quantize(tiny_llama_dir, *args)) == 2
    assert "one-sided" in capsys.readouterr().err
    for fit in available_fits():
        if not fit_uses_importance(fit):
            symmetric = ["--symmetric"] if fit == "absmax" else []
            args = ["--fit", fit, *symmetric, "--calibrate", "2", "--out", out]
            assert main(quantize(tiny_llama_dir, *args)) == 2
            err = capsys.readouterr().err
            assert "needs a searching fit" in err and f"{fit!r} does not use importance" in err
    assert not (tmp_path / "o").exists()


def test_threads_option_sets_torch_threads_and_checks_its_range(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        # inspect of a missing directory fails (exit 2) after the option was applied.
        assert main(["inspect", str(tmp_path / "none"), "--threads", "1"]) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path), "--threads", "0"]) == 2
    assert "--threads must be in 1.." in capsys.readouterr().err
    assert torch.get_num_threads() == before
