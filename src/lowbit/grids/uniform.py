"""The uniform integer grid: code q stands for the value q (0 .. 2**bits - 1)."""

from __future__ import annotations

import torch

from lowbit.grids.registry import register_grid


class UniformIntGrid:
    """Evenly spaced levels ``0 .. 2**bits - 1``; symmetric blocks centre it at ``2**(bits-1)``.

    Symmetric absmax scaling uses ``2**(bits-1) - 1`` steps on each side, so the lowest code is
    only reached by fits that clip (it is still a valid code).
    """

    name = "int"
    # decode(q) == q: dequantization may unpack codes straight into floats.
    codes_are_values = True
    min_bits = 2
    max_bits = 8

    def check_bits(self, bits: int) -> None:
        if not self.min_bits <= bits <= self.max_bits:
            raise ValueError(
                f"bits={bits} is out of range for grid 'int' "
                f"(supported: {self.min_bits}..{self.max_bits})"
            )

    def check_spec(self, spec) -> None:
        self.check_bits(spec.bits)

    def level_count(self, bits: int) -> int:
        return 1 << bits

    def preferred_layout(self, bits: int) -> str:
        return "dense"

    def value_range(self, bits: int) -> tuple[float, float]:
        return 0.0, float((1 << bits) - 1)

    def center(self, bits: int) -> float:
        return float(1 << (bits - 1))

    def encode_(self, normalized: torch.Tensor, bits: int) -> torch.Tensor:
        normalized.round_().clamp_(0, (1 << bits) - 1)
        return normalized.to(torch.uint8)

    def decode(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        return codes.to(torch.float32)


register_grid(UniformIntGrid())
