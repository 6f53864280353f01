"""`lowbit.choice`: the candidate specs of ``--grid best``, one per grid that takes the width."""

from __future__ import annotations

import pytest

from lowbit import QuantSpec
from lowbit.choice import candidate_specs, codebook_spec
from lowbit.cli import build_parser, cli_specs
from lowbit.grids import CodebookGrid, available_grids, get_grid
from lowbit.model import check_rules


def codebooks_taking(bits: int) -> list[str]:
    return [
        name
        for name in available_grids()
        if isinstance(get_grid(name), CodebookGrid)
        and get_grid(name).min_bits <= bits <= get_grid(name).max_bits
    ]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_then_every_codebook_of_the_width_in_its_natural_form(bits):
    spec = QuantSpec(bits=bits, group_size=32)
    specs = candidate_specs(spec)
    assert specs[0] == spec
    assert [s.grid for s in specs[1:]] == codebooks_taking(bits)
    if bits != 4:
        assert "nf4" not in {s.grid for s in specs} and "fp4" not in {s.grid for s in specs}
    for s in specs[1:]:
        two_sided = get_grid(s.grid).two_sided(bits)
        assert s.symmetric == two_sided
        # Two-sided: symmetric with the default range fit; one-sided: a float zero point.
        assert s.zero_point == ("int" if two_sided else "float")
        assert s.fit == ("absmax" if two_sided else "minmax")
        assert (s.bits, s.group_size, s.scale_dtype) == (bits, 32, spec.scale_dtype)
    check_rules({"*": specs})  # every candidate fits its grid and its fit


def test_symmetric_and_float_zero_requests_are_kept():
    sym = candidate_specs(QuantSpec(bits=4, group_size=64, symmetric=True))
    assert all(s.symmetric and s.fit == "absmax" for s in sym)
    floating = candidate_specs(QuantSpec(bits=4, group_size=64, zero_point="float"))
    assert all(not s.symmetric and s.zero_point == "float" for s in floating)
    check_rules({"*": floating})


def test_fit_options_scale_dtype_and_rotation_are_kept():
    spec = QuantSpec(
        bits=3,
        group_size=64,
        fit="mse",
        fit_options={"candidates": 10},
        scale_dtype="float32",
        rotation="hadamard",
        rotation_seed=7,
    )
    for s in candidate_specs(spec):
        assert (s.fit, s.options, s.scale_dtype) == ("mse", {"candidates": 10}, "float32")
        assert (s.rotation, s.rotation_seed) == ("hadamard", 7)


def test_a_codebook_spec_starts_the_list_with_int():
    specs = candidate_specs(QuantSpec(bits=4, grid="nf4", group_size=64))
    assert specs[0].grid == "int" and specs[0].symmetric  # the spec's own symmetry
    assert codebook_spec(QuantSpec(bits=4), "nf4") == QuantSpec(bits=4, grid="nf4")


def test_errors():
    with pytest.raises(TypeError, match="QuantSpec"):
        candidate_specs({"bits": 4})
    with pytest.raises(ValueError, match="unknown grid"):
        codebook_spec(QuantSpec(bits=4), "nf5")


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--zero-point", "float"],
        ["--bits", "3", "--fit", "mse", "--fit-option", "candidates=20"],
        ["--bits", "2", "--scale-dtype", "float32", "--rotate"],
    ],
)
def test_the_cli_asks_for_exactly_these(options):
    args = build_parser().parse_args(["quantize", "--grid", "best", "--group-size", "32", *options])
    base = cli_specs(build_parser().parse_args(["quantize", "--group-size", "32", *options]))
    assert cli_specs(args) == candidate_specs(base[0])


def test_symmetric_best_keeps_refusing_one_sided_codebooks():
    # As before candidate_specs existed: --symmetric asks every codebook to be symmetric, and
    # the one-sided ones cannot be (their grid says how to ask instead).
    args = build_parser().parse_args(["quantize", "--grid", "best", "--symmetric"])
    with pytest.raises(ValueError, match="one-sided"):
        cli_specs(args)
