"""Randomized Hadamard rotation along the input dimension (as in QuIP# and HIGGS).

``rotate(t, signs)`` maps each row ``r`` of ``t [..., n]`` to ``H (signs * r)`` with ``H`` the
normalised block-diagonal Walsh-Hadamard matrix: blocks of ``b`` = the largest power of two
dividing ``n`` (576 -> 64, 1536 -> 512, 4096 -> 4096). ``R = H diag(signs)`` is orthogonal, so
``x W^T = (x R^T)(W R^T)^T``: a layer quantizes ``W R^T`` and rotates its input the same way.
After the rotation the weights of a block look Gaussian, where a Gaussian-optimal grid is near
optimal. Computed by the fast transform: ``log2(b)`` butterfly passes, no dense matrix.
"""

from __future__ import annotations

import torch

from lowbit.packing import pack, unpack


def hadamard_block(n: int) -> int:
    """The largest power of two dividing ``n`` (the Hadamard block size used for ``n``)."""
    if n <= 0:
        raise ValueError(f"rotation needs a positive row length, got {n}")
    return n & -n


def fwht(t: torch.Tensor) -> torch.Tensor:
    """Normalised fast Walsh-Hadamard transform of each block of the last dim (a new tensor).

    The transform is its own inverse. Works in float32 for fp16/bf16 inputs and returns the
    input's dtype.
    """
    n = t.shape[-1]
    block = hadamard_block(n)
    x = t.to(torch.float32).reshape(-1, n // block, block).clone()
    h = 1
    while h < block:
        pairs = x.view(x.shape[0], x.shape[1], block // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).view_as(x)
        h *= 2
    x.mul_(block**-0.5)
    return x.view(t.shape).to(t.dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``n`` random +-1.0 (float32) from ``seed``; stored packed with the weight, so loading
    never depends on the random generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float32) * 2 - 1


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """+-1 float ``[n]`` -> uint8 ``[1, ceil(n/8)]`` (bit set = -1)."""
    return pack((signs < 0).to(torch.uint8).view(1, -1), 1)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_signs`: float32 ``[n]`` of +-1."""
    return 1.0 - 2.0 * unpack(packed, 1, n).view(-1).to(torch.float32)


def rotate(t: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``t R^T`` row by row: ``fwht(t * signs)`` over the last dim."""
    return fwht(t * signs.to(t.device, t.dtype))


def unrotate(t: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse of `rotate`: ``fwht(t) * signs``."""
    return fwht(t) * signs.to(t.device, t.dtype)
