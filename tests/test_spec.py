"""QuantSpec: defaults, derived fields, labels, dict round trips and validation."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.spec import SPEC_VERSION, QuantSpec


@st.composite
def valid_specs(draw):
    bits = draw(st.integers(1, 8))
    granularity = draw(st.sampled_from(["tensor", "channel", "group", None]))
    group_size = draw(st.integers(1, 512)) if granularity == "group" else None
    if granularity is None and draw(st.booleans()):
        group_size = draw(st.integers(1, 512))
    return QuantSpec(
        bits=bits,
        group_size=group_size,
        granularity=granularity,
        symmetric=draw(st.booleans()),
        fit=draw(st.sampled_from([None, "absmax", "minmax"])),
        scale_dtype=draw(st.sampled_from(["float16", "bfloat16", "float32"])),
    )


def test_defaults():
    spec = QuantSpec()
    assert spec.bits == 8
    assert spec.group_size is None
    assert spec.granularity == "channel"
    assert spec.symmetric is False
    assert spec.grid == "int"
    assert spec.fit == "minmax"
    assert spec.scale_dtype == "float16"
    assert spec.version == SPEC_VERSION


def test_symmetry_defaults_to_the_grids_natural_choice():
    # NF4 is symmetric by nature: no need to say so; int and float zero points are not.
    assert QuantSpec(grid="nf4", bits=4, group_size=64).symmetric is True
    assert QuantSpec(grid="nf4", bits=4, group_size=64).fit == "absmax"
    assert QuantSpec(grid="gaussian", bits=3).symmetric is True
    assert QuantSpec(grid="exponential", bits=3).symmetric is False  # one-sided codebook
    assert QuantSpec(grid="nf4", bits=4, zero_point="float").symmetric is False
    assert QuantSpec(bits=4).symmetric is False
    assert QuantSpec(grid="not-registered").symmetric is False
    # The resolved value is what the spec stores, so a saved spec reloads unchanged.
    spec = QuantSpec(grid="nf4", bits=4)
    assert spec.to_dict()["symmetric"] is True
    assert QuantSpec.from_dict(spec.to_dict()) == spec


def test_symmetric_with_a_float_zero_point_is_a_conflict():
    with pytest.raises(ValueError, match="symmetric=True conflicts with zero_point='float'"):
        QuantSpec(bits=4, symmetric=True, zero_point="float")


def test_derived_fields():
    assert QuantSpec(bits=4, group_size=64).granularity == "group"
    assert QuantSpec(symmetric=True).fit == "absmax"
    assert QuantSpec(symmetric=False).fit == "minmax"
    assert QuantSpec(symmetric=True, fit="minmax").fit == "minmax"
    assert QuantSpec(granularity="tensor").group_size is None


@pytest.mark.parametrize(
    ("spec", "label"),
    [
        (QuantSpec(bits=4, group_size=64), "int4 g64 asym"),
        (QuantSpec(bits=8, symmetric=True), "int8 channel sym"),
        (QuantSpec(bits=2, granularity="tensor"), "int2 tensor asym"),
        (QuantSpec(bits=3, group_size=128, symmetric=True), "int3 g128 sym"),
        (QuantSpec(bits=4, fit="absmax"), "int4 channel asym"),
        (QuantSpec(bits=4, grid="nf4", group_size=64), "nf4 g64 sym"),
        (QuantSpec(bits=4, grid="fp4", zero_point="float", group_size=32), "fp4 g32 asym-f"),
        (QuantSpec(bits=3, grid="gaussian", group_size=32), "gaussian3 g32 sym"),
    ],
)
def test_label(spec, label):
    assert spec.label == label


def test_frozen():
    spec = QuantSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 4


def test_equality_and_hash():
    assert QuantSpec(bits=4, group_size=32) == QuantSpec(bits=4, group_size=32, granularity="group")
    assert hash(QuantSpec(bits=4, group_size=32)) == hash(QuantSpec(bits=4, group_size=32))
    assert QuantSpec(bits=4) != QuantSpec(bits=3)


@settings(max_examples=80, deadline=None)
@given(valid_specs())
def test_dict_round_trip(spec):
    data = spec.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(QuantSpec)}
    assert QuantSpec.from_dict(data) == spec
    assert QuantSpec.from_dict(json.loads(json.dumps(data))) == spec
    assert data["bits"] == spec.bits and data["granularity"] == spec.granularity


def test_from_dict_rejects_unknown_keys_and_non_dicts():
    data = QuantSpec().to_dict()
    data["colour"] = "red"
    with pytest.raises(ValueError, match="colour"):
        QuantSpec.from_dict(data)
    with pytest.raises(TypeError):
        QuantSpec.from_dict([("bits", 4)])
    with pytest.raises(TypeError):
        QuantSpec.from_dict(None)


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec.from_dict({"bits": 12})
    with pytest.raises(ValueError, match="version"):
        QuantSpec.from_dict({**QuantSpec().to_dict(), "version": SPEC_VERSION + 1})


@pytest.mark.parametrize("bits", [0, 9, -1, 16])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", [True, 4.0, "4", None, float("nan"), float("inf")])
def test_bits_wrong_type(bits):
    with pytest.raises(TypeError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("group_size", [0, -64, 2**31, 10**22])
def test_group_size_out_of_range(group_size):
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=group_size)


@pytest.mark.parametrize("group_size", [True, 64.0, "64", float("nan"), float("inf")])
def test_group_size_wrong_type(group_size):
    with pytest.raises(TypeError, match="group_size"):
        QuantSpec(group_size=group_size)


def test_granularity_validation():
    with pytest.raises(ValueError, match="granularity"):
        QuantSpec(granularity="row")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(granularity="group")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(granularity="channel", group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(granularity="tensor", group_size=64)


def test_other_field_validation():
    with pytest.raises(TypeError, match="symmetric"):
        QuantSpec(symmetric=1)
    with pytest.raises(TypeError, match="grid"):
        QuantSpec(grid="")
    with pytest.raises(TypeError, match="grid"):
        QuantSpec(grid=None)
    with pytest.raises(TypeError, match="fit"):
        QuantSpec(fit=3)
    with pytest.raises(ValueError, match="scale_dtype"):
        QuantSpec(scale_dtype="float64")
    with pytest.raises(ValueError, match="version"):
        QuantSpec(version=0)


def test_fit_options_are_normalised_hashable_and_round_trip():
    spec = QuantSpec(bits=4, fit="mse", fit_options={"refits": 1, "candidates": 20})
    assert spec.fit_options == (("candidates", 20), ("refits", 1))
    assert spec.options == {"candidates": 20, "refits": 1}
    hash(spec)
    data = spec.to_dict()
    assert data["fit_options"] == {"candidates": 20, "refits": 1}
    assert QuantSpec.from_dict(data) == spec
    assert QuantSpec.from_dict(QuantSpec(bits=4).to_dict()).fit_options is None
    assert QuantSpec(bits=4, fit_options={}).fit_options is None
    assert "mse" in spec.label


@pytest.mark.parametrize(
    "options,err",
    [
        ([1, 2], TypeError),
        ({1: 2}, TypeError),
        ({"a": [1]}, TypeError),
        ({"a": float("nan")}, ValueError),
        ("candidates=3", TypeError),
    ],
)
def test_bad_fit_options(options, err):
    with pytest.raises(err, match="fit_options"):
        QuantSpec(bits=4, fit="mse", fit_options=options)
