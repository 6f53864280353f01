"""`Report`: what quantizing a model did, per layer and in total; prints as a table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    """One layer: its spec and what quantizing it cost (``spec`` is ``None`` when kept float)."""

    name: str
    shape: tuple[int, ...]
    spec: str | None
    bits_per_weight: float
    rel_error: float | None = None
    sqnr_db: float | None = None
    skipped: str | None = None
    config: dict | None = None  # the full QuantSpec.to_dict() of the layer
    # Entropy of the codes, bits/weight: their size after ideal entropy coding (<= spec bits).
    code_entropy: float | None = None
    # With several candidate specs: why this one was kept, and every candidate's figures
    # ({"spec", "bits_per_weight", "rel_error", "weighted_error"}).
    choice: str | None = None
    candidates: list[dict] | None = None
    # The paths the layer's forward takes on its device by batch size (`Plan.summary`),
    # e.g. "cpu_native:1-16,dequantize:17+".
    kernel: str | None = None

    @property
    def mixed_sizes(self) -> bool:
        """Whether this layer's candidate specs differed in stored bits/weight."""
        sizes = {round(c["bits_per_weight"], 9) for c in self.candidates or ()}
        return len(sizes) > 1


@dataclass
class Report:
    """Per-layer rows and totals of one `quantize_model` call.

    ``bytes_before`` / ``bytes_after`` count every parameter and buffer of the model once (tied
    tensors once); ``avg_bits_per_weight`` is over the quantized layers' weights only.
    """

    layers: list[LayerReport] = field(default_factory=list)
    parameters: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerReport]:
        """Rows of the layers that were quantized."""
        return [row for row in self.layers if row.skipped is None]

    @property
    def skipped(self) -> list[LayerReport]:
        """Rows of the layers kept in full precision, with the reason."""
        return [row for row in self.layers if row.skipped is not None]

    @property
    def avg_bits_per_weight(self) -> float:
        """Stored bits per weight over the quantized layers, weighted by size."""
        rows = self.quantized
        weights = sum(_numel(r.shape) for r in rows)
        if not weights:
            return 0.0
        return sum(r.bits_per_weight * _numel(r.shape) for r in rows) / weights

    @property
    def avg_code_entropy(self) -> float:
        """Entropy of the codes in bits/weight over the quantized layers, weighted by size: what
        an ideal entropy coder would shrink the codes to (scales and zero points not counted)."""
        rows = [r for r in self.quantized if r.code_entropy is not None]
        weights = sum(_numel(r.shape) for r in rows)
        if not weights:
            return 0.0
        return sum(r.code_entropy * _numel(r.shape) for r in rows) / weights

    @property
    def mean_rel_error(self) -> float:
        """Mean relative Frobenius error over the quantized layers."""
        rows = self.quantized
        return sum(r.rel_error for r in rows) / len(rows) if rows else 0.0

    def to_dict(self) -> dict:
        """JSON-able dict with per-layer rows and totals."""
        return {
            "layers": [_finite(asdict(r)) for r in self.layers],
            "totals": _finite(
                {
                    "layers_quantized": len(self.quantized),
                    "layers_skipped": len(self.skipped),
                    "parameters": self.parameters,
                    "bytes_before": self.bytes_before,
                    "bytes_after": self.bytes_after,
                    "avg_bits_per_weight": self.avg_bits_per_weight,
                    "avg_code_entropy": self.avg_code_entropy,
                    "mean_rel_error": self.mean_rel_error,
                    "seconds": self.seconds,
                }
            ),
            "warnings": list(self.warnings),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """``to_dict()`` as strict JSON text."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def table(self, max_rows: int | None = None) -> str:
        """Per-layer table (worst relative error first when ``max_rows`` cuts it) + totals.

        A ``*`` after a spec marks a layer whose candidate specs differed in size (see its
        ``choice``). The kernel column is the paths a forward takes on the layer's device, by
        batch size.
        """
        if max_rows is not None and (
            isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0
        ):
            raise ValueError(f"max_rows must be None or an int >= 0, got {max_rows!r}")
        rows = self.layers
        note = ""
        if max_rows is not None and len(rows) > max_rows:
            ranked = sorted(self.quantized, key=lambda r: -(r.rel_error or 0.0))
            rows = ranked[:max_rows]
            note = f"  ({max_rows} of {len(self.layers)} layers shown: largest error first)\n"
        width = max([len("layer")] + [len(r.name) for r in rows])
        head = (
            f"{'layer':<{width}}  {'shape':>11}  {'spec':<16} {'bits/w':>6}  "
            f"{'rel.err':>8}  {'SQNR dB':>7}  {'H bits':>6}  kernel"
        )
        lines = [head, "-" * len(head)]
        for r in rows:
            shape = "x".join(str(d) for d in r.shape)
            if r.skipped is not None:
                lines.append(
                    f"{r.name:<{width}}  {shape:>11}  {'kept: ' + r.skipped:<16} "
                    f"{r.bits_per_weight:>6.2f}"
                )
                continue
            spec = r.spec + ("*" if r.mixed_sizes else "")
            lines.append(
                f"{r.name:<{width}}  {shape:>11}  {spec:<16} {r.bits_per_weight:>6.3f}  "
                f"{r.rel_error:>8.5f}  {r.sqnr_db:>7.2f}  {_entropy_cell(r):>6}  {r.kernel or '-'}"
            )
        if any(r.mixed_sizes for r in rows):
            note += "  * chosen among candidate specs of different sizes (see the warnings)\n"
        return "\n".join(lines) + "\n" + note + self.summary()

    def summary(self) -> str:
        """The totals in a few lines."""
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        skipped = ", ".join(f"{r.name} ({r.skipped})" for r in self.skipped[:4])
        if len(self.skipped) > 4:
            skipped += f", ... {len(self.skipped) - 4} more"
        return (
            f"quantized {len(self.quantized)} layers, kept {len(self.skipped)} in full precision"
            + (f": {skipped}" if skipped else "")
            + f"\nparameters {self.parameters / 1e6:.1f}M | model "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
            f"({ratio:.2f}x smaller)"
            f" | quantized layers {self.avg_bits_per_weight:.3f} bits/weight, "
            f"mean rel. error {self.mean_rel_error:.4f} | {self.seconds:.1f} s"
            f"\ncodes' entropy {self.avg_code_entropy:.3f} bits/weight (the codes' size after "
            f"ideal entropy coding; H bits per layer)"
        )

    def __str__(self) -> str:
        return self.table()


def _finite(value):
    """JSON has no Infinity: an exact layer's SQNR (and similar, at any depth) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _entropy_cell(row: LayerReport) -> str:
    return "-" if row.code_entropy is None else f"{row.code_entropy:.3f}"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
