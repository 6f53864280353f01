"""Which specs compete for a layer when any grid may serve it (``lowbit quantize --grid best``).

`candidate_specs` turns one spec into the list `lowbit.quantize_model` chooses from per layer
(a rule whose value is a list; see its ``choose``): the integer grid and every registered
codebook grid that takes the spec's width. Each codebook gets its natural form, since an
integer zero point means nothing between unevenly spaced levels: symmetric where it is
two-sided (or the spec is symmetric), otherwise asymmetric with a float zero point.
"""

from __future__ import annotations

from dataclasses import replace

from lowbit.grids import CodebookGrid, available_grids, get_grid
from lowbit.spec import QuantSpec


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
