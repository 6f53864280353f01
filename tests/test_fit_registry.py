"""What fits declare at registration (`lowbit.fit.registry`): options with their allowed values,
importance, grid needs. Every test loops over the registry, so a new fit is covered the moment
it registers."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit import QuantSpec, quantize
from lowbit.fit import (
    Option,
    available_fits,
    bool_option,
    fit_defaults,
    fit_options,
    fit_uses_importance,
    float_option,
    get_fit_info,
    int_option,
    register_fit,
)
from lowbit.grids import get_grid

FITS = available_fits()


def spec_for(fit: str, **options) -> QuantSpec:
    # absmax stretches a symmetric range: give it the spec it is the default of.
    return QuantSpec(
        bits=3,
        group_size=32,
        symmetric=True if fit == "absmax" else None,
        fit=fit,
        fit_options=options or None,
    )


def out_of_range(option: Option) -> list:
    """Values just outside what ``option`` declares (finite: specs refuse NaN and Inf)."""
    if option.kind is bool:
        return []
    if option.choices:
        return ["not-" + "-".join(option.choices)]
    values = []
    step = 1 if option.kind is int else 1.0
    if option.low is not None:
        values.append(option.low if option.low_open else option.low - step)
    if option.high is not None and math.isfinite(option.high):
        values.append(option.high if option.high_open else option.high + step)
    return values


def wrong_type(option: Option):
    return {int: 2.5, float: "x", str: 3, bool: 1}[option.kind]


def declared():
    return [(fit, name, opt) for fit in FITS for name, opt in get_fit_info(fit).options.items()]


def weights(rows=16, cols=64, scale=0.02) -> torch.Tensor:
    """Student-t (3 degrees of freedom) weights times ``scale``, reproducible."""
    torch.manual_seed(0)
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * scale


@pytest.mark.parametrize("fit", FITS)
def test_every_fit_has_a_record(fit):
    info = get_fit_info(fit)
    assert info.name == fit and callable(info.fn)
    assert isinstance(info.uses_importance, bool) and isinstance(info.two_sided, bool)
    assert fit_defaults(fit) == {name: opt.default for name, opt in info.options.items()}
    assert fit_options(spec_for(fit)) == fit_defaults(fit)  # the defaults are a valid setting


@pytest.mark.parametrize("fit,name,option", declared())
def test_declared_defaults_are_allowed(fit, name, option):
    option.check(fit, name, option.default)
    assert out_of_range(option) or option.kind is bool or option.choices or option.kind is str


@pytest.mark.parametrize("fit,name,option", declared())
def test_out_of_range_values_are_refused_before_any_weight(fit, name, option):
    bad_values = out_of_range(option)
    if option.kind is not bool and option.low is None and option.high is None:
        assert option.choices or option.kind is str, f"{fit}.{name} declares no range"
    for value in bad_values:
        spec = spec_for(fit, **{name: value})
        with pytest.raises(ValueError, match=name) as caught:
            fit_options(spec)
        assert fit in str(caught.value)
        with pytest.raises(ValueError, match=name):
            quantize(weights(), spec)
    with pytest.raises(TypeError, match=name):
        fit_options(spec_for(fit, **{name: wrong_type(option)}))


@pytest.mark.parametrize("fit,name,option", declared())
def test_values_inside_the_range_are_taken(fit, name, option):
    ends = [v for v in (option.low, option.high) if v is not None and math.isfinite(v)]
    values = [option.default]
    values += [v for v in ends if not (v == option.low and option.low_open)]
    values = [v for v in values if not (v == option.high and option.high_open)]
    values += list(option.choices)
    for value in values:
        if value is None:
            continue
        assert fit_options(spec_for(fit, **{name: value}))[name] == value


@pytest.mark.parametrize("fit", FITS)
def test_uses_importance_matches_behaviour(fit):
    # Importance all ones against importance on every other input (each block sees both
    # halves). Some objectives (DARE's entropy term, HQQ's beta) are not scale-invariant, so
    # the weights are tried at several magnitudes: a fit uses importance if any of them moves.
    spec = spec_for(fit)
    skewed = torch.ones(64)
    skewed[1::2] = 1e-3
    changed = []
    for scale in (0.02, 1.0, 100.0):
        w = weights(scale=scale)
        even = quantize(w, spec, importance=torch.ones(64)).dequantize()
        changed.append(not torch.equal(even, quantize(w, spec, importance=skewed).dequantize()))
    assert any(changed) == fit_uses_importance(fit), (
        f"fit {fit!r} declares uses_importance={fit_uses_importance(fit)} but importance "
        f"{'changes' if any(changed) else 'does not change'} its result"
    )


@pytest.mark.parametrize("fit", FITS)
def test_two_sided_declaration_matches_behaviour(fit):
    one_sided = QuantSpec(bits=4, grid="exponential", zero_point="float", fit=fit)
    grid = get_grid("exponential")
    assert grid.value_range(4)[0] >= grid.center(4)
    if get_fit_info(fit).two_sided:
        with pytest.raises(ValueError, match="one-sided"):
            fit_options(one_sided)  # refused before any weight
    else:
        fit_options(one_sided)
        assert torch.isfinite(quantize(weights(), one_sided).dequantize()).all()


def test_messages_name_fit_option_and_range():
    with pytest.raises(ValueError, match=r"fit 'mse': candidates must be in 1\.\.10000, got 0"):
        fit_options(spec_for("mse", candidates=0))
    with pytest.raises(ValueError, match=r"min_ratio must be in \(0, 1\], got 1\.5"):
        fit_options(spec_for("mse", min_ratio=1.5))
    with pytest.raises(ValueError, match="source must be 'codes' or 'residual'"):
        fit_options(spec_for("entropy", source="weights"))
    with pytest.raises(ValueError, match="lambda_entropy must be finite and >= 0"):
        fit_options(spec_for("dare", lambda_entropy=-1.0))
    with pytest.raises(TypeError, match="'update_scale' must be bool or None, got 1"):
        fit_options(spec_for("hqq", update_scale=1))
    with pytest.raises(TypeError, match="'candidates' must be int, got 2.0"):
        fit_options(spec_for("mse", candidates=2.0))
    assert fit_options(spec_for("percentile", percentile=99))["percentile"] == 99  # int ok


def test_registration_checks_its_declarations():
    with pytest.raises(TypeError, match="Option"):
        register_fit("test-plain-defaults", {"candidates": 100})
    with pytest.raises(ValueError, match="candidates"):
        register_fit("test-bad-default", {"candidates": int_option(0, 1, 10)})
    with pytest.raises(ValueError, match="already registered"):
        register_fit("mse", {"x": float_option(1.0)}, uses_importance=True)(lambda *a: None)
    assert "test-plain-defaults" not in available_fits()
    assert bool_option(None).optional and not bool_option(True).optional
