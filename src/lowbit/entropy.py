"""Empirical entropy, in bits: of codes (what entropy coding would shrink them to) and of
histograms of residuals (the ``entropy`` fit's regulariser).

The entropy of a layer's codes, ``-sum(p_k log2 p_k)`` over the frequencies ``p_k`` of its
``2**bits`` codes, is the average size per weight that an ideal order-0 entropy coder (Huffman,
ANS) would store them in. Far below ``bits`` means the grid is poorly used: most weights fall on
a few levels, as with a coarse range fit on heavy-tailed weights.
"""

from __future__ import annotations

import torch


def entropy_bits(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of the histograms ``counts [..., K]`` (any non-negative dtype) -> float32
    ``[...]``; an empty histogram has entropy 0."""
    counts = counts.to(torch.float32)
    total = counts.sum(-1, keepdim=True)
    p = counts / total.clamp(min=1e-30)
    terms = torch.where(p > 0, p * torch.log2(p.clamp(min=1e-30)), torch.zeros_like(p))
    return -terms.sum(-1)


def code_histogram(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """How often each code ``0 .. levels-1`` occurs in the integer tensor ``codes``: int64
    ``[levels]``."""
    return torch.bincount(codes.reshape(-1).long(), minlength=levels)[:levels]


def block_code_entropy(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Entropy in bits of each row of the integer codes ``[B, n]`` -> float32 ``[B]``."""
    num_blocks = codes.shape[0]
    ids = codes.long() + levels * torch.arange(num_blocks, device=codes.device).unsqueeze(-1)
    counts = torch.bincount(ids.reshape(-1), minlength=num_blocks * levels)
    return entropy_bits(counts.view(num_blocks, levels))


def block_histogram_entropy(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Entropy in bits of a ``bins``-bin histogram of each row of float ``values [B, n]``,
    spanning the row's own [min, max] (a constant row: 0 bits) -> float32 ``[B]``."""
    num_blocks = values.shape[0]
    lo, hi = torch.aminmax(values, dim=-1, keepdim=True)
    width = (hi - lo).clamp(min=torch.finfo(torch.float32).tiny)
    index = ((values - lo) / width * bins).long().clamp_(0, bins - 1)
    index += bins * torch.arange(num_blocks, device=values.device).unsqueeze(-1)
    counts = torch.bincount(index.reshape(-1), minlength=num_blocks * bins)
    return entropy_bits(counts.view(num_blocks, bins))
