"""Name rules: which spec(s) a layer of a model gets, checked without a model.

``rules`` is one `QuantSpec` for every layer, or ``{pattern: spec | None | [spec, ...]}``:
patterns are globs on the full module name or ``re:<regex>`` (`lowbit.modules.match_pattern`),
the first match wins, ``None`` keeps the layer float and a list is a set of candidates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from lowbit.fit import fit_options, get_fit
from lowbit.grids import get_grid
from lowbit.modules import check_pattern, match_pattern
from lowbit.spec import QuantSpec

Rules = QuantSpec | Mapping[str, "QuantSpec | None | Sequence[QuantSpec]"]


def _check_spec(spec: QuantSpec, where: str) -> None:
    """Everything about ``spec`` that does not depend on a weight: grid, bits, fit, options."""
    try:
        get_grid(spec.grid).check_spec(spec)
        get_fit(spec.fit)
        fit_options(spec)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def rule_specs(pattern, value) -> tuple[QuantSpec, ...] | None:
    """A rule's value as candidate specs (``None``: keep float); TypeError if malformed."""
    if value is None:
        return None
    if isinstance(value, QuantSpec):
        return (value,)
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(spec, QuantSpec) for spec in value)
    ):
        return tuple(value)
    got = (
        "an empty list"
        if isinstance(value, (list, tuple)) and not value
        else f"{type(value).__name__} {value!r}"[:120]
    )
    raise TypeError(
        f"rules entry {pattern!r}: expected a QuantSpec, None (keep float) or a non-empty list "
        f"of QuantSpec (candidates), got {got}"
    )


def exclude_list(exclude) -> list[str]:
    """``exclude`` as a list of checked patterns (one str is one pattern; None is none)."""
    if exclude is None:
        return []
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(exclude, Iterable) or isinstance(exclude, Mapping):
        raise TypeError(f"exclude must be a list of name patterns, got {exclude!r}")
    exclude = list(exclude)
    for pattern in exclude:
        check_pattern(pattern, "exclude pattern")
    return exclude


def check_rules(rules: Rules, exclude: Iterable[str] | str | None = ()) -> None:
    """Check ``rules`` and ``exclude`` as `quantize_model` takes them, without a model.

    Every pattern is compiled and every spec checked against its grid and fit, so a caller (the
    CLI) can refuse bad options before spending time loading a model.

    Raises:
        TypeError: ``rules`` is neither a `QuantSpec` nor a mapping; a rule's key is not a str;
            a rule's value is not a `QuantSpec`, ``None`` or a non-empty list of `QuantSpec`;
            ``exclude`` is not a str or an iterable of str.
        ValueError: a pattern is empty or its ``re:`` regex does not compile, or a spec does
            not fit its grid or fit (bits out of range, unknown fit option, ...); the message
            names the pattern.
    """
    if isinstance(rules, QuantSpec):
        _check_spec(rules, "rules")
    elif isinstance(rules, Mapping):
        for pattern, value in rules.items():
            if not isinstance(pattern, str):
                raise TypeError(
                    f"rules entry {pattern!r}: keys must be name patterns (str: a glob or "
                    f"'re:<regex>'), got {type(pattern).__name__}"
                )
            check_pattern(pattern, "rules pattern")
            for spec in rule_specs(pattern, value) or ():
                _check_spec(spec, f"rules entry {pattern!r} ({spec.label})")
    else:
        raise TypeError(
            f"rules must be a QuantSpec or a dict of pattern -> spec, got {type(rules).__name__}"
        )
    exclude_list(exclude)


def resolve_specs(name: str, rules: Rules) -> tuple[tuple[QuantSpec, ...], str | None, str | None]:
    """(candidate specs, reason kept float, matching pattern) for module ``name``.

    The first matching rule wins; its value is a spec, ``None`` (keep float) or a list of specs
    (candidates, see `quantize_model`'s ``choose``).
    """
    if isinstance(rules, QuantSpec):
        return (rules,), None, None
    for pattern, value in rules.items():
        if match_pattern(pattern, name):
            specs = rule_specs(pattern, value)
            if specs is None:
                return (), f"rule {pattern!r}", pattern
            return specs, None, pattern
    return (), "no rule", None
