"""What a rounding step works on (`Problem`) and where it puts its result (`Output`).

A rounding step turns one 2-D weight into codes and block parameters. It calls the spec's fit
on float32 blocks through `Problem.fit_blocks` (which also rounds the parameters to what will
be stored and checks them) and turns rows into codes through `Problem.encode`; it hands both to
`Output`, which packs the codes through the spec's storage layout as they come, so a step that
works in row chunks never holds more than a chunk of unpacked codes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.dtypes import FLOAT_DTYPES
from lowbit.grids import Grid
from lowbit.layouts import get_layout
from lowbit.spec import QuantSpec
from lowbit.storage import stored_params
from lowbit.tensor import BlockLayout

# Rows are processed in chunks of about this many weights, so the float32 working copy stays
# bounded (a 128k x 8k embedding would otherwise need a 4 GB temporary).
CHUNK_ELEMENTS = 1 << 20

FitFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class Problem:
    """One weight to round, with everything a rounding step may use.

    Attributes:
        matrix: ``[rows, cols]``, the weight as `BlockLayout` views it (float32, float16 or
            bfloat16; float32 once rotated).
        blocks: its `BlockLayout` (rows, groups, group length, partial last group).
        grid: the spec's grid.
        spec: the `QuantSpec`.
        fit: the spec's fit, ``fit(blocks [B, n] float32, grid, spec, weights=None) -> (scale
            [B], zero [B] or None)``; call it through `fit_blocks`.
        importance: float32 ``[rows, cols]`` weights of the squared error (an expanded view),
            or None.
        context: per-layer statistics a rounding method needs (GPTQ's Hessian, say), or None.
        name: how errors refer to the weight.
    """

    matrix: torch.Tensor
    blocks: BlockLayout
    grid: Grid
    spec: QuantSpec
    fit: FitFn
    importance: torch.Tensor | None = None
    context: Any = None
    name: str = "tensor"
    lost: list[float] = field(default_factory=list)  # energy of blocks whose scale underflowed

    @property
    def scale_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.spec.scale_dtype]

    def row_chunks(self) -> Iterator[tuple[int, int]]:
        """(start, stop) row ranges of about `CHUNK_ELEMENTS` weights each (at least one row).

        On accelerators the chunks are 64x larger: there the cost is per kernel launch.
        """
        budget = CHUNK_ELEMENTS if self.matrix.device.type == "cpu" else CHUNK_ELEMENTS * 64
        step = max(1, budget // max(1, self.blocks.padded_cols))
        for r0 in range(0, self.blocks.rows, step):
            yield r0, min(self.blocks.rows, r0 + step)

    def complete_groups(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows [r, cols]`` -> ``[r, padded_cols]``: a partial last group is completed with
        its own values repeated, which keeps its range (and roughly its distribution)."""
        lay = self.blocks
        if not lay.ragged:
            return rows
        tail = rows[:, (lay.groups - 1) * lay.group_len :]
        repeat = torch.arange(lay.padded_cols - lay.cols, device=rows.device) % tail.shape[1]
        return torch.cat([rows, tail[:, repeat]], dim=1)

    def group_weights(self, r0: int, r1: int) -> torch.Tensor | None:
        """Importance of rows ``r0:r1`` as float32 ``[blocks, group_len]``, or None. With a
        partial last group the completing copies weigh 0, so weighted fits see only the real
        values (unweighted ones see the repeats, whose range is the real one)."""
        lay = self.blocks
        weights = self.importance
        if not lay.ragged:
            return None if weights is None else weights[r0:r1].reshape(-1, lay.group_len)
        device = self.matrix.device
        real = torch.ones(r1 - r0, lay.cols, device=device) if weights is None else weights[r0:r1]
        padded = torch.nn.functional.pad(real.to(torch.float32), (0, lay.padded_cols - lay.cols))
        return padded.reshape(-1, lay.group_len)

    def fit_blocks(
        self, blocks: torch.Tensor, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Fit float32 ``blocks [B, n]`` and round the result for storage.

        Returns (stored scale [B] in the spec's scale dtype, zero [B] float32 in code units as
        dequantization will see it, stored zero [B] or None); see
        `lowbit.storage.stored_params`. Raises ``ValueError`` naming the weight for NaN/Inf,
        a range beyond float32, or scales/offsets that overflow the scale dtype; blocks whose
        scale underflows are stored as zeros and their energy noted for `quantize`'s check.
        """
        spec, grid, name = self.spec, self.grid, self.name
        # Fits propagate NaN/Inf of a block into its scale (their reductions do), so checking
        # the scales catches bad weights without another pass over the data.
        scale, zero = self.fit(blocks, grid, spec, weights=weights)
        if not (torch.isfinite(scale).all() and (zero is None or torch.isfinite(zero).all())):
            if not torch.isfinite(blocks).all():
                raise ValueError(f"{name} contains NaN or Inf; clean the weights before quantizing")
            low, high = blocks.min().item(), blocks.max().item()
            raise ValueError(
                f"{name}: its values span {low:.4g} to {high:.4g}, a range that overflows "
                "float32 in the scale fit (no scale dtype can store it); rescale the weights"
            )
        vmin, vmax = grid.value_range(spec.bits)
        stored, zero_codes, kept = stored_params(
            scale, zero, vmin, vmax, grid.center(spec.bits), spec, self.scale_dtype
        )
        if kept is not None and not torch.isfinite(kept).all():
            raise ValueError(
                f"{name}: offsets overflow {spec.scale_dtype}; use scale_dtype='float32'"
            )
        if not torch.isfinite(stored).all():
            raise ValueError(
                f"{name}: scales overflow {spec.scale_dtype}; use scale_dtype='float32'"
            )
        zeroed = (stored == 0) & (scale > 0)
        if zeroed.any():
            self.lost.append(blocks[zeroed].to(torch.float64).square().sum().item())
        return stored, zero_codes, kept

    def encode(
        self, rows: torch.Tensor, scale: torch.Tensor, zero_codes: torch.Tensor
    ) -> torch.Tensor:
        """uint8 codes ``[r, cols]`` of ``rows [r, cols or padded_cols]`` given their stored
        scales and zero points in code units ``[r or 1, groups]``."""
        lay, grid, spec = self.blocks, self.grid, self.spec
        r = rows.shape[0]
        if rows.shape[1] != lay.padded_cols:
            rows = self.complete_groups(rows)
        scale32 = scale.to(torch.float32)
        # An all-zero block has scale 0: every weight maps to the zero point, restored as 0.
        inv = torch.where(scale32 > 0, scale32.reciprocal(), torch.zeros_like(scale32))
        zero = zero_codes.to(torch.float32).unsqueeze(-1)
        blocks = rows.reshape(r, lay.groups, lay.group_len).to(torch.float32)
        if grid.codes_are_values and (spec.symmetric or spec.zero_point == "int"):
            # An integer zero is added after rounding: adding it first (128 at 8 bits) costs the
            # quotient low bits, and dividing (not multiplying by 1/s) rounds exactly as
            # round(w / s), the formula of DARE and SmolQuant, at every tie and near-tie.
            scale3 = scale32.unsqueeze(-1)
            safe = torch.where(scale3 > 0, scale3, torch.ones_like(scale3))
            normalized = torch.where(scale3 > 0, blocks / safe, 0.0).round_().add_(zero)
        else:
            normalized = torch.addcmul(zero, blocks, inv.unsqueeze(-1))
        codes = grid.encode_(normalized, spec.bits).view(r, lay.padded_cols)
        return codes[:, : lay.cols]


@dataclass
class Output:
    """The stored tensors a rounding step fills: packed codes and block parameters."""

    packed: torch.Tensor  # uint8 [rows, row_bytes], through the spec's storage layout
    scale: torch.Tensor  # [scale_rows, groups] in the scale dtype
    zero_codes: torch.Tensor  # float32 [scale_rows, groups], zero points in code units
    zero_stored: torch.Tensor  # float32 [scale_rows, groups], as they will be stored
    spec: QuantSpec

    @classmethod
    def empty(cls, problem: Problem) -> Output:
        """Buffers of the right shapes for ``problem`` (scales 1, zeros 0, codes 0)."""
        shapes = problem.blocks.expected_shapes(problem.spec)
        device = problem.matrix.device
        return cls(
            packed=torch.zeros(shapes["packed"], dtype=torch.uint8, device=device),
            scale=torch.ones(shapes["scale"], dtype=problem.scale_dtype, device=device),
            zero_codes=torch.zeros(shapes["scale"], dtype=torch.float32, device=device),
            zero_stored=torch.zeros(shapes["scale"], dtype=torch.float32, device=device),
            spec=problem.spec,
        )

    def put_params(
        self,
        rows: slice,
        scale: torch.Tensor,
        zero_codes: torch.Tensor,
        kept: torch.Tensor | None,
    ) -> None:
        """Store the parameters of scale rows ``rows`` (``[r, groups]`` or flat)."""
        target = self.scale[rows]
        self.scale[rows] = scale.view(target.shape)
        self.zero_codes[rows] = zero_codes.view(target.shape)
        if kept is not None:
            self.zero_stored[rows] = kept.view(target.shape)

    def put_codes(self, r0: int, r1: int, codes: torch.Tensor) -> None:
        """Pack uint8 codes ``[r1 - r0, cols]`` of rows ``r0:r1``."""
        self.packed[r0:r1] = get_layout(self.spec.layout).pack(codes, self.spec.bits)
