"""`QuantizedTensor`: packed codes + scales + zero points + spec + shape; restores itself."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit import native

# FLOAT_DTYPES / DTYPE_NAMES live in lowbit.dtypes; re-exported for existing importers.
from lowbit.dtypes import DTYPE_NAMES as DTYPE_NAMES
from lowbit.dtypes import FLOAT_DTYPES as FLOAT_DTYPES
from lowbit.entropy import code_histogram, entropy_bits
from lowbit.grids import get_grid
from lowbit.layouts import get_layout
from lowbit.packing import packed_row_bytes, unpack
from lowbit.rotation import unpack_signs, unrotate
from lowbit.spec import QuantSpec

# Rows per dequantization chunk on CPU: about 1 MB of float32, so temporaries stay in cache.
DEQUANT_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class BlockLayout:
    """How a tensor of ``shape`` is cut into blocks under ``spec``.

    The tensor is viewed as a matrix ``[rows, cols]`` (``rows = shape[0]``, ``cols`` = the
    product of the other dims; a 1-D tensor is one row, a scalar is ``[1, 1]``). Each row holds
    ``groups`` blocks of ``group_len`` values; scales are ``[scale_rows, groups]`` where
    ``scale_rows`` is 1 for a per-tensor spec. When ``group_len`` does not divide ``cols`` the
    last group of each row is partial (``ragged``): ``groups = ceil(cols / group_len)``, and
    only the ``cols`` real codes are stored.
    """

    rows: int
    cols: int
    scale_rows: int
    groups: int
    group_len: int

    @classmethod
    def of(cls, shape: tuple[int, ...], spec: QuantSpec) -> BlockLayout:
        """The layout of a tensor of ``shape`` under ``spec`` (ValueError if groups do not fit)."""
        shape = tuple(shape)
        if len(shape) == 0:
            rows, cols = 1, 1
        elif len(shape) == 1:
            rows, cols = 1, shape[0]
        else:
            rows, cols = shape[0], math.prod(shape[1:])
        if spec.granularity == "tensor":
            return cls(rows, cols, 1, 1, cols)
        if spec.granularity == "channel":
            return cls(rows, cols, rows, 1, cols)
        if 0 < cols <= spec.group_size:  # one group per row: the per-row layout, unpadded
            return cls(rows, cols, rows, 1, cols)
        groups = -(-cols // spec.group_size)
        return cls(rows, cols, rows, groups, spec.group_size)

    @property
    def padded_cols(self) -> int:
        """``groups * group_len``: the row length with the last group completed."""
        return self.groups * self.group_len

    @property
    def ragged(self) -> bool:
        """Whether the last group of each row is partial."""
        return self.padded_cols != self.cols

    def expected_shapes(self, spec: QuantSpec) -> dict[str, tuple[int, ...]]:
        """Shapes of the stored tensors: ``packed``, ``scale`` and (asymmetric) ``zero``."""
        shapes = {
            "packed": (self.rows, get_layout(spec.layout).row_bytes(self.cols, spec.bits)),
            "scale": (self.scale_rows, self.groups),
        }
        if not spec.symmetric and spec.zero_point == "float":
            shapes["zero"] = (self.scale_rows, self.groups)
        elif not spec.symmetric:
            shapes["zero"] = (self.scale_rows, packed_row_bytes(self.groups, spec.bits))
        if spec.rotation:
            shapes["signs"] = (1, packed_row_bytes(self.cols, 1))
        return shapes


@dataclass
class QuantizedTensor:
    """A quantized tensor that needs nothing else to restore itself.

    Attributes:
        packed: uint8 ``[rows, ceil(cols*bits/8)]``, codes bit-packed row by row (see `packing`).
        scale: ``[scale_rows, groups]`` in ``spec.scale_dtype``.
        zero: uint8 ``[scale_rows, ceil(groups*bits/8)]``, packed integer zero points, or ``None``
            for symmetric specs.
        spec: the `QuantSpec` it was made with.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (``dequantize`` returns it).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec
    shape: torch.Size
    dtype: torch.dtype
    signs: torch.Tensor | None = None

    @property
    def layout(self) -> BlockLayout:
        """The `BlockLayout` of this tensor."""
        return BlockLayout.of(self.shape, self.spec)

    @property
    def device(self) -> torch.device:
        """The device the codes live on."""
        return self.packed.device

    def numel(self) -> int:
        """Number of weights represented."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes + scales + packed zero points."""
        total = self.packed.numel() + self.scale.numel() * self.scale.element_size()
        for extra in (self.zero, self.signs):
            if extra is not None:
                total += extra.numel() * extra.element_size()
        return total

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, everything counted (0.0 for an empty tensor)."""
        n = self.numel()
        return 8.0 * self.nbytes / n if n else 0.0

    def codes(self) -> torch.Tensor:
        """Unpacked codes, uint8 ``[rows, cols]``."""
        return get_layout(self.spec.layout).unpack(self.packed, self.spec.bits, self.layout.cols)

    def code_entropy(self) -> float:
        """Empirical entropy of the codes, in bits per weight: the size an ideal order-0 entropy
        coder would store them in (at most ``spec.bits``; see `lowbit.entropy`)."""
        if self.numel() == 0:
            return 0.0
        levels = 1 << self.spec.bits
        counts = torch.zeros(levels, dtype=torch.int64, device=self.packed.device)
        rows = max(1, (1 << 20) // max(1, self.layout.cols))
        storage = get_layout(self.spec.layout)
        for r0 in range(0, self.layout.rows, rows):
            codes = storage.unpack(self.packed[r0 : r0 + rows], self.spec.bits, self.layout.cols)
            counts += code_histogram(codes, levels)
        return float(entropy_bits(counts))

    def zero_points(self) -> torch.Tensor:
        """Zero points as float32 ``[scale_rows, groups]`` (the grid centre when symmetric)."""
        lay = self.layout
        if self.zero is None:
            center = get_grid(self.spec.grid).center(self.spec.bits)
            return torch.full((lay.scale_rows, lay.groups), center, device=self.device)
        if self.spec.zero_point == "float":
            # Stored as the block's value at the lowest code (see quantize.float_zero).
            vmin, _ = get_grid(self.spec.grid).value_range(self.spec.bits)
            scale = self.scale.to(torch.float32)
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = vmin - self.zero.to(torch.float32) / safe
            return torch.where(scale > 0, zero, torch.full_like(zero, vmin))
        return unpack(self.zero, self.spec.bits, lay.groups).to(torch.float32)

    def dequantize(
        self,
        dtype: torch.dtype | None = None,
        *,
        out: torch.Tensor | None = None,
        rotated: bool = False,
    ) -> torch.Tensor:
        """Restore the tensor: ``(grid_value(q) - zero) * scale``, shape ``shape``.

        Works through rows in cache-sized chunks on CPU, so the only large write is the output
        (fresh large allocations cost page faults that dominate the arithmetic).

        Args:
            dtype: output dtype; defaults to the original tensor's dtype.
            out: optional preallocated tensor of ``shape`` and ``dtype`` on this device to fill.
            rotated: for a rotated spec, return ``W R^T`` (what the codes hold, what a layer
                multiplies its rotated input with) instead of ``W``.
        """
        lay = self.layout
        out_dtype = dtype or (out.dtype if out is not None else self.dtype)
        if not out_dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {out_dtype}")
        if out is None:
            out = torch.empty(self.shape, dtype=out_dtype, device=self.device)
        elif out.shape != self.shape or out.dtype != out_dtype or out.device != self.device:
            raise ValueError(
                f"out must be a {out_dtype} tensor of shape {list(self.shape)} on {self.device}, "
                f"got {out.dtype} {list(out.shape)} on {out.device}"
            )
        if self.numel() == 0:
            return out.zero_()
        # Values past the output dtype's range (a float16 weight of 65504 whose scale rounded
        # up) are clamped to it, never turned into inf.
        limit = torch.finfo(out_dtype).max
        if self.signs is not None and not rotated:
            restored = self.dequantize(torch.float32, rotated=True).view(lay.rows, lay.cols)
            restored = unrotate(restored, unpack_signs(self.signs, lay.cols))
            return out.copy_(restored.view(self.shape).clamp_(-limit, limit))
        grid = get_grid(self.spec.grid)
        if self._dequantize_native(out, limit):
            return out
        storage = get_layout(self.spec.layout)
        bits = self.spec.bits
        zero = self.zero_points().unsqueeze(-1)
        scale = self.scale.to(torch.float32).unsqueeze(-1)
        vmin, vmax = grid.value_range(bits)
        reach = scale.abs() * torch.maximum((vmax - zero).abs(), (vmin - zero).abs())
        clamp = bool(reach.max() >= limit)
        per_row = lay.scale_rows == lay.rows
        # A ragged last group is completed with zeros, restored, and cropped again.
        target = None if lay.ragged else out.view(lay.rows, lay.groups, lay.group_len)
        flat = scratch = None
        if lay.ragged:
            try:
                flat = out.view(lay.rows, lay.cols)
            except RuntimeError:  # a strided out=: restore into a scratch matrix, copy once
                flat = scratch = torch.empty(lay.rows, lay.cols, dtype=out.dtype, device=out.device)
        step = lay.rows
        if self.device.type == "cpu":
            step = max(1, DEQUANT_CHUNK_ELEMENTS // max(1, lay.cols))
        for r0 in range(0, lay.rows, step):
            r1 = min(lay.rows, r0 + step)
            if grid.codes_are_values:
                values = torch.empty(r1 - r0, lay.cols, device=self.device)
                storage.unpack_into(self.packed[r0:r1], bits, values)
            else:
                values = grid.decode(storage.unpack(self.packed[r0:r1], bits, lay.cols), bits)
            if lay.ragged:
                values = torch.nn.functional.pad(values, (0, lay.padded_cols - lay.cols))
            values = values.view(r1 - r0, lay.groups, lay.group_len)
            if per_row:
                values.sub_(zero[r0:r1]).mul_(scale[r0:r1])
            else:
                values.sub_(zero).mul_(scale)
            if clamp:
                values.clamp_(-limit, limit)
            if target is None:
                flat[r0:r1].copy_(values.view(r1 - r0, lay.padded_cols)[:, : lay.cols])
            else:
                target[r0:r1].copy_(values)
        if scratch is not None:
            out.copy_(scratch.view(self.shape))
        return out

    def _dequantize_native(self, out: torch.Tensor, limit: float) -> bool:
        """Fill ``out`` with the native CPU kernel when it takes this tensor (dense layout, an
        output matrix with unit column stride); False leaves ``out`` to the eager path."""
        if not native.supports(self):
            return False
        lay = self.layout
        try:
            matrix = out.view(lay.rows, lay.cols)
        except RuntimeError:  # a strided out= that no matrix view covers
            return False
        if matrix.stride(1) != 1:
            return False
        native.dequantize_into(self, matrix, limit)
        return True

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy on ``device`` (codes and scales unchanged)."""
        return QuantizedTensor(
            self.packed.to(device),
            self.scale.to(device),
            None if self.zero is None else self.zero.to(device),
            self.spec,
            self.shape,
            self.dtype,
            None if self.signs is None else self.signs.to(device),
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (``packed``, ``scale``, and ``zero`` if asymmetric)."""
        tensors = {"packed": self.packed, "scale": self.scale}
        if self.zero is not None:
            tensors["zero"] = self.zero
        if self.signs is not None:
            tensors["signs"] = self.signs
        return tensors

    def metadata(self) -> dict:
        """JSON-able description: spec, shape and dtype (everything but the tensors)."""
        return {
            "spec": self.spec.to_dict(),
            "shape": list(self.shape),
            "dtype": DTYPE_NAMES[self.dtype],
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], metadata: dict) -> QuantizedTensor:
        """Rebuild from ``state_tensors()`` and ``metadata()``, checking every shape and dtype."""
        spec = QuantSpec.from_dict(metadata["spec"])
        shape = torch.Size(metadata["shape"])
        dtype_name = metadata["dtype"]
        if dtype_name not in FLOAT_DTYPES:
            raise ValueError(f"unsupported dtype {dtype_name!r} in quantized tensor metadata")
        get_grid(spec.grid).check_spec(spec)
        expected = BlockLayout.of(shape, spec).expected_shapes(spec)
        for name, want in expected.items():
            if name not in tensors:
                raise ValueError(f"quantized tensor is missing its {name!r} tensor")
            got = tuple(tensors[name].shape)
            if got != want:
                raise ValueError(f"tensor {name!r} has shape {list(got)}, expected {list(want)}")
        integer = ("packed", "signs") if spec.zero_point == "float" else ("packed", "zero", "signs")
        for name in integer:
            if name in expected and tensors[name].dtype != torch.uint8:
                raise ValueError(f"tensor {name!r} must be uint8, got {tensors[name].dtype}")
        if tensors["scale"].dtype != FLOAT_DTYPES[spec.scale_dtype]:
            raise ValueError(
                f"tensor 'scale' has dtype {tensors['scale'].dtype}, spec says {spec.scale_dtype}"
            )
        if not torch.isfinite(tensors["scale"]).all():
            raise ValueError("tensor 'scale' contains NaN or Inf")
        if "zero" in expected and spec.zero_point == "float":
            if tensors["zero"].dtype != FLOAT_DTYPES[spec.scale_dtype]:
                raise ValueError(
                    f"tensor 'zero' has dtype {tensors['zero'].dtype}, spec says {spec.scale_dtype}"
                )
            if not torch.isfinite(tensors["zero"]).all():
                raise ValueError("tensor 'zero' contains NaN or Inf")
        return cls(
            tensors["packed"],
            tensors["scale"],
            tensors.get("zero") if not spec.symmetric else None,
            spec,
            shape,
            FLOAT_DTYPES[dtype_name],
            tensors.get("signs") if spec.rotation else None,
        )
