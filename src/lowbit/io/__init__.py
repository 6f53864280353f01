"""Saving and loading quantized models (safetensors + JSON; never pickle)."""

from lowbit.io.checkpoint import FORMAT_VERSION, load, read_manifest, save

__all__ = ["FORMAT_VERSION", "load", "read_manifest", "save"]
