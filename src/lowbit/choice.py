"""Choosing among candidate specs for a layer: which compete, and how they are compared.

`candidate_specs` turns one spec into the list `lowbit.quantize_model` chooses from per layer
(``lowbit quantize --grid best``; a rule whose value is a list): the integer grid and every
registered codebook grid that takes the spec's width. Each codebook gets its natural form,
since an integer zero point means nothing between unevenly spaced levels: symmetric where it
is two-sided (or the spec is symmetric), otherwise asymmetric with a float zero point.

Measured candidates (`Tried`, errors from `weight_error`) are ranked by `choice_score` under a
rule of `CHOICE_RULES`; `choice_text` and `mixed_sizes_warning` say what was chosen and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lowbit.grids import CodebookGrid, available_grids, get_grid
from lowbit.spec import QuantSpec

# How quantize_model picks among several candidate specs of one layer.
CHOICE_RULES = ("error", "size_adjusted")


@dataclass
class Tried:
    """One candidate spec of a layer, as measured (``bits`` per weight, relative error, SQNR
    in dB, importance-weighted relative error or None)."""

    label: str
    bits: float
    rel: float
    sqnr: float
    weighted: float | None  # importance-weighted relative error, when importance is given

    @property
    def error(self) -> float:
        """The error candidates are compared by."""
        return self.rel if self.weighted is None else self.weighted


def candidate_specs(spec: QuantSpec) -> list[QuantSpec]:
    """``spec`` on the ``int`` grid, then on every registered codebook that takes ``spec.bits``.

    Everything but the grid, the symmetry, the zero point and (for the default range fits)
    the fit comes from ``spec``: bits, layout, fit and its options, scale dtype, rotation.
    The int candidate keeps ``spec``'s symmetry; the codebooks take theirs from
    `codebook_spec`. A new codebook grid joins the list the moment it registers.

    Returns:
        ``[int spec, codebook specs in grid-name order]``; the specs are not checked against
        their grid and fit here (``lowbit.model.check_rules`` does that).
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    specs = [spec if spec.grid == "int" else replace(spec, grid="int")]
    for name in available_grids():
        grid = get_grid(name)
        if isinstance(grid, CodebookGrid) and grid.min_bits <= spec.bits <= grid.max_bits:
            specs.append(codebook_spec(spec, name))
    return specs


def codebook_spec(spec: QuantSpec, grid: str) -> QuantSpec:
    """``spec`` moved onto the codebook ``grid`` in the codebook's natural form.

    Symmetric when ``spec`` is, or when ``spec`` has an integer zero point and the codebook
    is two-sided at ``spec.bits`` (``nf4``, ``gaussian``, ...); otherwise asymmetric with a
    float zero point (one-sided codebooks such as ``exponential``, or a ``spec`` that asked
    for a float zero point). The default range fit follows the new symmetry (``absmax`` when
    symmetric, ``minmax`` otherwise); any other fit is kept.

    Raises:
        ValueError: ``grid`` is not registered, or it cannot take ``spec.bits`` (a two-sided
            test needs a width the codebook has).
    """
    codebook = get_grid(grid)
    symmetric = spec.symmetric or (spec.zero_point == "int" and codebook.two_sided(spec.bits))
    default_fit = "absmax" if spec.symmetric else "minmax"
    return replace(
        spec,
        grid=grid,
        symmetric=symmetric,
        zero_point=spec.zero_point if symmetric else "float",
        fit=None if spec.fit == default_fit else spec.fit,
    )


def choice_score(row: Tried, choose: str) -> float:
    """What candidates are ranked by (smaller wins) under rule ``choose``."""
    if choose == "size_adjusted":
        # Each stored bit is worth halving the error (6.02 dB), so compare at equal size.
        return row.error * 2.0**row.bits
    return row.error


def choice_text(tried: list[Tried], best: Tried, choose: str) -> str:
    """The report's ``choice`` line: which candidate was kept, by which rule, among which."""
    weighted = best.weighted is not None
    metric = "importance-weighted error" if weighted else "error"
    rule = f"smallest {metric}"
    if choose == "size_adjusted":
        rule = f"smallest {metric} x 2^bits/weight (size-adjusted)"
    sizes = {round(t.bits, 9) for t in tried}
    note = "; candidates differ in size" if len(sizes) > 1 else ""
    listed = ", ".join(f"{t.label} {t.error:.4g} at {t.bits:.3f} b/w" for t in tried)
    return f"{best.label}: {rule} of {len(tried)}{note} ({listed})"


def mixed_sizes_warning(mixed: list[tuple[str, list[Tried], Tried]], choose: str) -> str:
    """The report's warning when layers' candidates differed in stored bits/weight."""
    low = min(t.bits for _, tried, _ in mixed for t in tried)
    high = max(t.bits for _, tried, _ in mixed for t in tried)
    larger = sum(1 for _, tried, best in mixed if best.bits > min(t.bits for t in tried) + 1e-9)
    text = (
        f"candidate specs differ in stored size on {len(mixed)} layers ({low:.3f}-{high:.3f} "
        f"bits/weight); {larger} of them kept a larger candidate than the smallest. "
    )
    if choose == "error":
        return text + (
            "choose='error' keeps the most accurate whatever it costs; "
            "choose='size_adjusted' compares them at equal size (each bit halves the error)"
        )
    return text + "choose='size_adjusted' compared them at equal size (each bit halves the error)"


def weight_error(
    weight: torch.Tensor, restored: torch.Tensor, *, importance: torch.Tensor | None = None
) -> tuple[float, float]:
    """(relative error, SQNR in dB) of ``restored`` against ``weight``.

    Args:
        weight, restored: float tensors of the same shape (any dtype; compared in float32).
        importance: optional non-negative weights of the squared error, ``weight``'s shape or
            ``[in_features]`` of a 2-D weight: the error is then
            ``sqrt(sum(w (weight - restored)**2) / sum(w weight**2))``; without it, the relative
            Frobenius error.

    Returns:
        An exact restore gives ``(0.0, inf)``; an all-zero ``weight`` restored with an error
        gives ``(inf, -inf)``.
    """
    for arg, value in (("weight", weight), ("restored", restored)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{arg} must be a tensor, got {type(value).__name__}")
    if weight.shape != restored.shape:
        raise ValueError(f"restored has shape {list(restored.shape)}, weight {list(weight.shape)}")
    w = weight.detach().to(torch.float32)
    diff = w - restored.detach().to(device=w.device, dtype=torch.float32)
    if importance is None:
        err = diff.norm().item()
        ref = w.norm().item()
    else:
        imp = importance.detach().to(device=w.device, dtype=torch.float32)
        if imp.shape != w.shape and not (w.dim() == 2 and imp.shape == (w.shape[1],)):
            raise ValueError(
                f"importance has shape {list(imp.shape)}; expected {list(w.shape)} or "
                f"[{w.shape[-1] if w.dim() else 1}]"
            )
        err = math.sqrt(max(0.0, (imp * diff.square()).sum().item()))
        ref = math.sqrt(max(0.0, (imp * w.square()).sum().item()))
    if ref == 0.0:
        return (0.0 if err == 0.0 else float("inf")), (
            float("inf") if err == 0.0 else float("-inf")
        )
    if err == 0.0:
        return 0.0, float("inf")
    rel = err / ref
    return rel, -20.0 * math.log10(rel)
