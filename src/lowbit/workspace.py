"""Scratch buffers for restored weights: one per thread, dtype and device, reused by every layer.

A layer restores its weight (or a tile of it) into scratch memory inside its own forward and is
done with it when the forward returns, so one buffer, grown to the largest request, serves all
layers: it costs one float copy of the largest layer (or tile), not of the model. Reusing it
matters: a fresh multi-megabyte allocation is a fresh mapping whose page faults cost more than
restoring the weight.
"""

from __future__ import annotations

import math
import threading

import torch

_BUFFERS = threading.local()


def scratch(shape, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of ``shape`` (uninitialised) from this thread's buffer for ``dtype`` on
    ``device``; valid until the next `scratch` call of this thread for the same dtype/device."""
    buffers = getattr(_BUFFERS, "buffers", None)
    if buffers is None:
        buffers = _BUFFERS.buffers = {}
    numel = math.prod(shape)
    key = (dtype, torch.device(device))
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(key, None)  # free the smaller one first
        # A normal tensor, even when first needed under inference_mode: an inference tensor
        # could not be written to by a later forward outside it.
        with torch.inference_mode(False):
            buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def release_workspaces() -> int:
    """Free this thread's scratch buffers; returns the bytes released."""
    buffers = getattr(_BUFFERS, "buffers", None) or {}
    released = sum(b.numel() * b.element_size() for b in buffers.values())
    buffers.clear()
    return released
