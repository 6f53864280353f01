"""Codes <-> bytes: k-bit codes (k = 1..8) packed densely along the last dimension.

Layout: a row of ``n`` codes is one little-endian bit stream; code ``i`` occupies bits
``[i*k, (i+1)*k)``, bit 0 being the least significant bit of byte 0. A row takes exactly
``ceil(n*k/8)`` bytes: no bits are wasted except in the last byte of each row.
"""

from __future__ import annotations

import torch


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of ``n`` codes of ``bits`` bits takes."""
    return (n * bits + 7) // 8


def _check(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes [..., n]`` (each ``< 2**bits``) into uint8 ``[..., ceil(n*bits/8)]``.

    Codes are not checked against ``2**bits`` on the hot path; out-of-range bits would spill into
    the neighbour, so callers pass codes produced by a grid's ``encode_``.
    """
    _check(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    *lead, n = codes.shape
    out_bytes = packed_row_bytes(n, bits)
    if bits == 8:
        return codes.contiguous()
    if codes.numel() == 0:
        return codes.new_zeros(*lead, out_bytes)
    # Row-major working copy: the views below assume it (transposed/sliced codes crashed).
    flat = codes.reshape(-1, n).contiguous()
    rows = flat.shape[0]
    if 8 % bits == 0:
        per_byte = 8 // bits
        pad = (-n) % per_byte
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        grouped = flat.view(rows, -1, per_byte)
        out = grouped[..., 0].clone()
        for j in range(1, per_byte):
            out |= grouped[..., j] << (j * bits)
        return out.view(*lead, out_bytes)
    # 8 codes of k bits make exactly k bytes: assemble them in an int64 word, then split.
    pad = (-n) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    grouped = flat.view(rows, -1, 8).to(torch.int64)
    word = grouped[..., 0].clone()
    for j in range(1, 8):
        word |= grouped[..., j] << (j * bits)
    shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=codes.device)
    out = ((word.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).view(rows, -1)
    return out[:, :out_bytes].reshape(*lead, out_bytes)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 ``[..., ceil(n*bits/8)]`` -> uint8 codes ``[..., n]``."""
    _check(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    *lead, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, bits):
        raise ValueError(
            f"packed rows have {nbytes} bytes, expected {packed_row_bytes(n, bits)} "
            f"for n={n} codes of {bits} bits"
        )
    if bits == 8:
        return packed.contiguous()
    if packed.numel() == 0 or n == 0:
        return packed.new_zeros(*lead, n)
    flat = packed.reshape(-1, nbytes).contiguous()
    rows = flat.shape[0]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (flat.unsqueeze(-1) >> shifts) & mask
        return codes.view(rows, -1)[:, :n].reshape(*lead, n)
    groups = (n + 7) // 8
    pad = groups * bits - nbytes
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    grouped = flat.view(rows, groups, bits).to(torch.int64)
    word = grouped[..., 0].clone()
    for j in range(1, bits):
        word |= grouped[..., j] << (8 * j)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=packed.device)
    codes = ((word.unsqueeze(-1) >> shifts) & mask).to(torch.uint8).view(rows, -1)
    return codes[:, :n].reshape(*lead, n)


def unpack_into(packed: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Unpack rows of codes straight into ``out [rows, n]`` (any dtype, e.g. float32).

    Same result as ``out.copy_(unpack(packed, bits, n))``, without the uint8 intermediate when
    ``bits`` divides 8 and ``n`` fills whole bytes (about 3x faster on CPU).
    """
    _check(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    rows, n = out.shape
    per_byte = 8 // bits if 8 % bits == 0 else 0
    if bits == 8 or not per_byte or n % per_byte or packed.shape != (rows, n // per_byte):
        return out.copy_(unpack(packed, bits, n))
    slots = out.view(rows, n // per_byte, per_byte)
    mask = (1 << bits) - 1
    for j in range(per_byte):
        shifted = packed >> (j * bits) if j else packed
        slots[..., j].copy_(shifted & mask if j < per_byte - 1 else shifted)
    return out
