"""Hugging Face models: load a local checkpoint, and save/load a quantized one with its config.

Imports transformers lazily: it is an optional extra (``pip install lowbit[hf]``).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from lowbit.io.checkpoint import load, read_manifest, save


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


def load_pretrained(path: str | os.PathLike, dtype="auto"):
    """(model, tokenizer) from a local Hugging Face directory, in eval mode."""
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(path)
    cls = tf.AutoModelForCausalLM if is_causal_lm(config) else tf.AutoModel
    model = cls.from_pretrained(path, dtype=dtype).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def save_quantized(
    model: nn.Module, tokenizer, directory: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """`save` plus the model's ``config.json`` and the tokenizer, so the directory stands alone."""

    def write_extra(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return save(model, directory, metadata=metadata, write_extra=write_extra)


def load_quantized(directory: str | os.PathLike):
    """(model, tokenizer) from a directory written by `save_quantized`.

    The skeleton is built from ``config.json`` with empty (meta) parameters, so loading needs
    no memory for float weights that are about to be replaced.
    """
    tf = _transformers()
    from accelerate import init_empty_weights

    read_manifest(directory)
    config = tf.AutoConfig.from_pretrained(directory)
    cls = tf.AutoModelForCausalLM if is_causal_lm(config) else tf.AutoModel
    with init_empty_weights(include_buffers=False):
        skeleton = cls.from_config(config)
    model = load(directory, skeleton).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    return model, tokenizer
