"""Storage layouts: how a row of codes becomes bytes, and back. A registered axis of the spec.

A layout stores each row of ``cols`` codes (uint8, ``0 <= code < levels``) in ``row_bytes(cols,
bits)`` bytes, rows independent so that row slices stay cheap. Two are registered:

* ``dense``: a little-endian bit stream of ``bits`` bits per code (`lowbit.packing`); any
  width 1..8, ``ceil(cols * bits / 8)`` bytes per row. The default of every grid so far.
* ``base3``: five ternary digits per byte (``c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4 <= 242``), so
  codes of a grid with at most three levels take 1.6 bits each instead of 2
  (``ceil(cols / 5)`` bytes per row). For ternary (1.58-bit) weights.

To add a layout, write an object with the `Layout` methods and `register_layout` it; a spec
names it with ``QuantSpec(layout=...)`` and `quantize` / `QuantizedTensor` use it through
`get_layout`, nothing else changes.
"""

from __future__ import annotations

from functools import cache
from typing import Protocol

import torch

from lowbit import packing
from lowbit.registry import Registry


class Layout(Protocol):
    """Rows of codes <-> rows of bytes."""

    name: str

    def check(self, bits: int, levels: int) -> None:
        """Raise ``ValueError`` unless this layout can store codes ``0..levels-1`` of width
        ``bits``."""

    def row_bytes(self, cols: int, bits: int) -> int:
        """Bytes one row of ``cols`` codes takes."""

    def pack(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        """uint8 codes ``[..., cols]`` -> uint8 ``[..., row_bytes(cols, bits)]``."""

    def unpack(self, packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
        """Inverse of ``pack``: uint8 ``[..., row_bytes(cols, bits)]`` -> uint8 ``[..., cols]``."""

    def unpack_into(self, packed: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
        """Unpack rows straight into ``out [rows, cols]`` (any dtype); returns ``out``."""


class DenseLayout:
    """``bits`` bits per code, a little-endian bit stream per row (see `lowbit.packing`)."""

    name = "dense"

    def check(self, bits: int, levels: int) -> None:
        if levels > 1 << bits:
            raise ValueError(
                f"layout 'dense' stores {1 << bits} codes at {bits} bits, not {levels}"
            )

    def row_bytes(self, cols: int, bits: int) -> int:
        return packing.packed_row_bytes(cols, bits)

    def pack(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        return packing.pack(codes, bits)

    def unpack(self, packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
        return packing.unpack(packed, bits, cols)

    def unpack_into(self, packed: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
        return packing.unpack_into(packed, bits, out)


TRITS_PER_BYTE = 5
_POWERS = (1, 3, 9, 27, 81)


@cache
def _trit_table(device: torch.device) -> torch.Tensor:
    """uint8 ``[256, 5]``: the base-3 digits of every byte, least significant first. Bytes
    above 242 (never written) decode digit-wise too, so a corrupted byte cannot give a code
    of 3 or more."""
    values = torch.arange(256, dtype=torch.int64)
    digits = torch.stack([(values // p) % 3 for p in _POWERS], dim=1)
    return digits.to(torch.uint8).to(device)


class Base3Layout:
    """Five codes of a grid with at most three levels per byte: 1.6 bits per code."""

    name = "base3"

    def check(self, bits: int, levels: int) -> None:
        if levels > 3:
            raise ValueError(
                f"layout 'base3' stores codes of at most 3 levels (ternary grids), not {levels}; "
                "use layout='dense'"
            )

    def row_bytes(self, cols: int, bits: int) -> int:
        return -(-cols // TRITS_PER_BYTE)

    def pack(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        if codes.dtype != torch.uint8:
            raise TypeError(f"codes must be uint8, got {codes.dtype}")
        *lead, cols = codes.shape
        nbytes = self.row_bytes(cols, bits)
        if codes.numel() == 0:
            return codes.new_zeros(*lead, nbytes)
        flat = codes.reshape(-1, cols)
        pad = nbytes * TRITS_PER_BYTE - cols
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        trits = flat.reshape(-1, nbytes, TRITS_PER_BYTE).to(torch.int16)
        # Horner's rule from the most significant digit: stays below 243 in int16.
        packed = trits[..., 4]
        for j in (3, 2, 1, 0):
            packed = packed * 3 + trits[..., j]
        return packed.to(torch.uint8).reshape(*lead, nbytes)

    def unpack(self, packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
        if packed.dtype != torch.uint8:
            raise TypeError(f"packed must be uint8, got {packed.dtype}")
        if isinstance(cols, bool) or not isinstance(cols, int) or cols < 0:
            raise ValueError(f"cols must be a non-negative int, got {cols!r}")
        *lead, nbytes = packed.shape
        if nbytes != self.row_bytes(cols, bits):
            raise ValueError(
                f"base3 rows have {nbytes} bytes, expected {self.row_bytes(cols, bits)} "
                f"for {cols} codes"
            )
        if packed.numel() == 0 or cols == 0:
            return packed.new_zeros(*lead, cols)
        digits = _trit_table(packed.device)[packed.reshape(-1, nbytes).long()]
        codes = digits.reshape(-1, nbytes * TRITS_PER_BYTE)[:, :cols]
        return codes.reshape(*lead, cols)

    def unpack_into(self, packed: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.unpack(packed, bits, out.shape[-1]))


_REGISTRY: Registry[Layout] = Registry("layout")


def register_layout(layout: Layout) -> Layout:
    """Add ``layout`` under ``layout.name``; a second layout with the same name is an error."""
    return _REGISTRY.add(getattr(layout, "name", None), layout)


def get_layout(name: str) -> Layout:
    """The layout registered as ``name``; an unknown name raises listing the registered ones."""
    return _REGISTRY.get(name)


def available_layouts() -> list[str]:
    """Names of all registered layouts."""
    return _REGISTRY.names()


register_layout(DenseLayout())
register_layout(Base3Layout())
