"""Hugging Face models: load a local checkpoint, and save/load a quantized one with its config.

Imports transformers lazily: it is an optional extra (``pip install lowbit[hf]``).
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

from torch import nn

from lowbit.io.checkpoint import MANIFEST, load, read_manifest, save


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError("Hugging Face support needs the extra: pip install 'lowbit[hf]'") from err
    return transformers


def is_causal_lm(config) -> bool:
    """Whether a config describes a causal language model (else it is loaded as an encoder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        archs = getattr(config, "architectures", None) or []
        # A causal-LM family saved as a bare backbone (LlamaModel, say) has no head to load.
        return not archs or any(not a.endswith("Model") for a in archs)
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def load_config(path: str | os.PathLike):
    """The Hugging Face config of a local directory, or a ValueError saying why not."""
    tf = _transformers()
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{str(path)!r} has no config.json: not a Hugging Face model directory")
    try:
        return tf.AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers raises many types for a bad config
        raise ValueError(f"cannot read the config of {str(path)!r}: {err}") from None


def load_tokenizer(path: str | os.PathLike, *, required: bool = True):
    """The tokenizer of a local directory; ``None`` when it has none and ``required`` is false.

    Raises:
        ValueError: none can be loaded and ``required`` is true (the message says why).
    """
    tf = _transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(path)
    except Exception as err:  # missing files surface as OSError, ValueError, TypeError...
        if not required:
            return None
        raise ValueError(f"cannot load a tokenizer from {str(path)!r}: {err}") from None


def check_model_dir(path: str | os.PathLike) -> Path:
    """Refuse, before loading, a directory whose weights lowbit cannot load as a float model.

    Raises:
        ValueError: it is a lowbit checkpoint (already quantized: its Linear weights are packed
            codes that transformers would replace with random ones), or its weights exist only
            as pickle files (``.bin``/``.pt``/``.pth``; lowbit never unpickles).
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        source = None
        with contextlib.suppress(ValueError, OSError):
            source = read_manifest(path).get("metadata", {}).get("source_model")
        hint = f" (it was quantized from {source}; quantize that instead)" if source else ""
        raise ValueError(
            f"{str(path)!r} is a lowbit checkpoint, already quantized{hint}; load it with "
            "lowbit.io.hf.load_quantized or evaluate it with 'lowbit eval'"
        )
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise ValueError(
                f"{str(path)!r} holds its weights only as pickle files ({', '.join(pickles[:3])});"
                " lowbit loads safetensors only, since unpickling can run arbitrary code: convert "
                "the checkpoint (model.save_pretrained(..., safe_serialization=True)) first"
            )
        raise ValueError(f"{str(path)!r} has no .safetensors weights")
    return path


def load_pretrained(path: str | os.PathLike, dtype="auto", *, tokenizer: bool | None = None):
    """(model, tokenizer) from a local Hugging Face directory, in eval mode.

    Args:
        path: the model directory (safetensors weights; pickles are refused).
        dtype: passed to ``from_pretrained`` (``"auto"``: the checkpoint's own dtype).
        tokenizer: ``True`` requires one, ``False`` skips it (returns ``None``), ``None`` loads
            it when the directory has one.

    Raises:
        ValueError: a lowbit checkpoint or pickle-only weights (see `check_model_dir`), weights
            that cannot be read (truncated, corrupted), or a model whose weights were not all in
            the checkpoint (transformers would initialise them randomly).
    """
    tf = _transformers()
    path = check_model_dir(path)
    config = load_config(path)
    cls = tf.AutoModelForCausalLM if is_causal_lm(config) else tf.AutoModel
    try:
        model, info = cls.from_pretrained(
            path, dtype=dtype, use_safetensors=True, output_loading_info=True
        )
    except Exception as err:  # SafetensorError, OSError, RuntimeError, ValueError, ...
        raise ValueError(
            f"cannot load the weights of {str(path)!r}: {type(err).__name__}: {err}"
        ) from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise ValueError(
            f"{str(path)!r} does not hold all the weights of its {type(model).__name__}: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            + (f", wrong shape {mismatched[:3]}" if mismatched else "")
            + f" ({len(missing) + len(mismatched)} in all); they would be random"
        )
    model.eval()
    tok = None if tokenizer is False else load_tokenizer(path, required=bool(tokenizer))
    return model, tok


def save_quantized(
    model: nn.Module, tokenizer, directory: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """`save` plus the model's ``config.json`` and the tokenizer, so the directory stands alone."""

    def write_extra(tmp: Path) -> None:
        config = copy.deepcopy(model.config)
        if not getattr(config, "architectures", None):
            # Recorded so the directory loads back as the same class (a bare backbone is
            # otherwise taken for a causal LM of its family).
            config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return save(model, directory, metadata=metadata, write_extra=write_extra)


def load_quantized(directory: str | os.PathLike, *, tokenizer: bool | None = True):
    """(model, tokenizer) from a directory written by `save_quantized`.

    The skeleton is built from ``config.json`` with empty (meta) parameters, so loading needs
    no memory for float weights that are about to be replaced. ``tokenizer``: as in
    `load_pretrained` (``True``: required, ``False``: not loaded, ``None``: if present).
    """
    tf = _transformers()
    from accelerate import init_empty_weights

    read_manifest(directory)
    config = load_config(directory)
    cls = tf.AutoModelForCausalLM if is_causal_lm(config) else tf.AutoModel
    with init_empty_weights(include_buffers=False):
        skeleton = cls.from_config(config)
    model = load(directory, skeleton).eval()
    tok = None if tokenizer is False else load_tokenizer(directory, required=bool(tokenizer))
    return model, tok
