"""`quantize_model`: replace the `nn.Linear` layers of any model by `QuantLinear`, by name rules."""

from __future__ import annotations

import fnmatch
import functools
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.fit import fit_options, get_fit
from lowbit.grids import get_grid
from lowbit.nn import QuantLinear
from lowbit.progress import bar
from lowbit.quantize import quantize
from lowbit.report import LayerReport, Report
from lowbit.rotation import hadamard_block
from lowbit.spec import QuantSpec
from lowbit.tensor import FLOAT_DTYPES

# Below this block size a Hadamard rotation mixes too few inputs to spread outliers.
MIN_USEFUL_HADAMARD = 16

# Weights scanned per step when checking for NaN/Inf up front: bounds the boolean temporary.
_SCAN_ELEMENTS = 1 << 22

# How quantize_model picks among several candidate specs of one layer.
CHOICE_RULES = ("error", "size_adjusted")

# The keyword arguments quantize_model hands to every new QuantLinear.
LAYER_KWARGS = ("kernel", "cache_dequantized")

Rules = QuantSpec | Mapping[str, "QuantSpec | None | Sequence[QuantSpec]"]


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern:
    """``pattern`` (glob or ``re:<regex>``) as a compiled regex matched against whole names."""
    if pattern.startswith("re:"):
        source = pattern[3:]
        if not source:
            raise ValueError("pattern 're:' has an empty regular expression")
        try:
            return re.compile(source)
        except re.error as err:
            raise ValueError(
                f"pattern {pattern!r} is not a valid regular expression: {err}"
            ) from None
    if not pattern:
        raise ValueError("empty name pattern (it would match only the model itself)")
    # A glob never fails to compile: fnmatch treats an unclosed '[' as a literal.
    return re.compile(fnmatch.translate(pattern))


def check_pattern(pattern: str, what: str = "pattern") -> None:
    """Raise unless ``pattern`` is a usable name pattern (a non-empty glob or ``re:<regex>``
    whose regex compiles); ``what`` names it in the message (``"exclude pattern"``, say)."""
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be a str (a glob or 're:<regex>'), got {pattern!r}")
    try:
        _compiled(pattern)
    except ValueError as err:
        raise ValueError(f"{what} {pattern!r}: {err}") from None


def match_pattern(pattern: str, name: str) -> bool:
    """Whether module ``name`` matches ``pattern``: a glob (``*.mlp.*``) or ``re:<regex>``.

    Both match the whole name. Raises ``ValueError`` naming ``pattern`` if it is empty or its
    regex does not compile, ``TypeError`` if either argument is not a str.
    """
    if not isinstance(pattern, str) or not isinstance(name, str):
        raise TypeError(f"pattern and name must be str, got {pattern!r} and {name!r}")
    check_pattern(pattern)
    return _compiled(pattern).fullmatch(name) is not None


def _check_spec(spec: QuantSpec, where: str) -> None:
    """Everything about ``spec`` that does not depend on a weight: grid, bits, fit, options."""
    try:
        get_grid(spec.grid).check_spec(spec)
        get_fit(spec.fit)
        fit_options(spec)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _rule_specs(pattern, value) -> tuple[QuantSpec, ...] | None:
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


def _exclude_list(exclude) -> list[str]:
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
            for spec in _rule_specs(pattern, value) or ():
                _check_spec(spec, f"rules entry {pattern!r} ({spec.label})")
    else:
        raise TypeError(
            f"rules must be a QuantSpec or a dict of pattern -> spec, got {type(rules).__name__}"
        )
    _exclude_list(exclude)


def resolve_specs(name: str, rules: Rules) -> tuple[tuple[QuantSpec, ...], str | None, str | None]:
    """(candidate specs, reason kept float, matching pattern) for module ``name``.

    The first matching rule wins; its value is a spec, ``None`` (keep float) or a list of specs
    (candidates, see `quantize_model`'s ``choose``).
    """
    if isinstance(rules, QuantSpec):
        return (rules,), None, None
    for pattern, value in rules.items():
        if match_pattern(pattern, name):
            specs = _rule_specs(pattern, value)
            if specs is None:
                return (), f"rule {pattern!r}", pattern
            return specs, None, pattern
    return (), "no rule", None


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``[out, in]`` weight of a layer computing ``x @ W.T + b``, or None.

    Plain `nn.Linear`, and Hugging Face's ``Conv1D`` (GPT-2 family; it stores ``W.T``). Subclasses
    of `nn.Linear` are not taken: their forward may use ``.weight`` directly.
    """
    if type(module) is nn.Linear:
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t()
    return None


def _tied_owners(model: nn.Module) -> dict[str, str]:
    """For each linear layer whose weight storage a module that stays float (an embedding, say)
    also holds: that module's name. Linear layers sharing a weight are quantized together."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if linear_weight(module) is not None:
            continue
        for param in module.parameters(recurse=False):
            if param.device.type != "meta":
                owners.setdefault(param.untyped_storage().data_ptr(), []).append(name)
    tied = {}
    for name, module in model.named_modules():
        weight = linear_weight(module)
        if weight is None or weight.device.type == "meta":
            continue
        others = [o for o in owners.get(weight.untyped_storage().data_ptr(), []) if o != name]
        if others:
            tied[name] = others[0]
    return tied


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``model``, each storage counted once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type == "meta":
            key = (id(tensor), 0)
        else:
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class _Tried:
    """One candidate spec of a layer, as measured."""

    label: str
    bits: float
    rel: float
    sqnr: float
    weighted: float | None  # importance-weighted relative error, when importance is given

    @property
    def error(self) -> float:
        """The error candidates are compared by."""
        return self.rel if self.weighted is None else self.weighted


def quantize_model(
    model: nn.Module,
    rules: Rules,
    exclude: Iterable[str] | str | None = (),
    *,
    progress: bool | None = None,
    quantize_tied: bool = False,
    importance: Mapping[str, torch.Tensor] | None = None,
    choose: str = "error",
    quiet_patterns: Iterable[str] = (),
    **layer_kwargs,
) -> Report:
    """Quantize every `nn.Linear` of ``model`` in place, choosing a spec per layer by name.

    Everything is checked before any layer is touched, and every selected layer is quantized
    before any is swapped: on an error the model is left exactly as it was.

    Args:
        model: any module; its `nn.Linear` children (and Hugging Face ``Conv1D``) at any depth
            are replaced by `QuantLinear`. Layers that already are `QuantLinear` are listed as
            kept ("already quantized") and never quantized again.
        rules: one `QuantSpec` for all layers, or ``{pattern: spec | None | [spec, ...]}``:
            patterns are globs on the full module name (``"*.mlp.down_proj"``) or
            ``"re:<regex>"``, matched against the whole name; the first match wins; ``None``
            keeps the layer in full precision; a list of specs is a set of candidates, one of
            which is kept per layer (see ``choose``); unmatched layers stay float.
        exclude: patterns of layers to keep in full precision whatever the rules say (one str
            is one pattern).
        progress: a tqdm bar over the layers: ``None`` (default) shows it when standard error
            is a terminal and the quantization lasts more than 2 s (``LOWBIT_PROGRESS=1``/``0``
            overrides); ``True`` always, ``False`` never.
        quantize_tied: also quantize layers whose weight is tied to another module (an
            ``lm_head`` sharing the embedding, say); off by default, since the float tensor
            stays for the other module and quantizing then makes the model larger.
        importance: ``{layer name: weights}`` for the searching fits (``mse``, ``hqq``,
            ``entropy``): float ``[in_features]`` or the weight's ``[out, in]``, finite and
            >= 0, e.g. from `lowbit.calibrate.input_importance`. Layers not named are fitted
            unweighted. Candidates of a named layer are compared by the importance-weighted
            error ``sqrt(sum(w (W - W_hat)**2) / sum(w W**2))``.
        choose: how one of several candidate specs is picked per layer (ties go to the smaller,
            then the earlier candidate):

            * ``"error"`` (default): the smallest error, whatever the candidate's size. When the
              candidates of a layer differ in stored bits/weight (an asymmetric int4 spec with
              its zero points against a symmetric codebook, say), the larger one usually wins;
              the report then says so (a warning, each row's ``choice``, a ``*`` in the table).
            * ``"size_adjusted"``: the smallest ``error * 2**bits_per_weight``, i.e. the largest
              SQNR minus 6.02 dB per stored bit: candidates are compared as if brought to the
              same size by the high-rate rule that each bit halves the error, so a candidate
              0.125 bits/weight larger must be 8.3% more accurate to win. The reported error
              stays the candidate's own.

            With candidates of equal size both rules pick the same spec.
        quiet_patterns: patterns (of ``rules`` or ``exclude``) that may match no layer without
            a warning: defaults a caller adds on the user's behalf (the CLI's ``lm_head``
            exclusion on an encoder). Patterns the user gave still warn.
        **layer_kwargs: passed to `QuantLinear` (``kernel``, ``cache_dequantized``).

    Returns:
        A `Report` (per layer: name, shape ``(out, in)``, spec, bits/weight, relative Frobenius
        error, SQNR, code entropy, and with candidates the ``choice`` made; warnings).

    Raises:
        TypeError: an argument of the wrong type (``rules``/``exclude``: see `check_rules`;
            ``importance`` not a mapping of str to float tensors; ``progress``,
            ``quantize_tied`` not bools; unknown ``layer_kwargs``), or a selected layer's
            weight is not float32, float16 or bfloat16.
        ValueError: a bad pattern or spec (see `check_rules`); ``choose`` unknown; ``model``
            is itself a linear layer (it cannot be replaced in place: use
            `QuantLinear.from_linear`); a selected layer's weight is on the meta device, holds
            NaN/Inf, or its importance has the wrong shape or values; every layer the rules
            select is already a `QuantLinear`. Messages name the layer; the model is left
            untouched. (A group size that does not divide ``in_features`` is fine: each row's
            last group is partial. Layers with no weights (0 in or out features) are kept as
            they are.)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_rules(rules, ())
    exclude = _exclude_list(exclude)
    if isinstance(quiet_patterns, str):
        quiet_patterns = [quiet_patterns]
    if not isinstance(quiet_patterns, Iterable):
        raise TypeError(f"quiet_patterns must be a list of patterns, got {quiet_patterns!r}")
    quiet = set(quiet_patterns)
    if not all(isinstance(p, str) for p in quiet):
        raise TypeError(f"quiet_patterns must be a list of str, got {sorted(quiet, key=str)!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")
    if not isinstance(quantize_tied, bool):
        raise TypeError(f"quantize_tied must be a bool, got {quantize_tied!r}")
    if choose not in CHOICE_RULES:
        raise ValueError(f"choose must be one of {CHOICE_RULES}, got {choose!r}")
    unknown = sorted(set(layer_kwargs) - set(LAYER_KWARGS))
    if unknown:
        raise TypeError(
            f"quantize_model got unexpected keyword argument(s) {unknown}; the ones passed to "
            f"QuantLinear are {list(LAYER_KWARGS)}"
        )
    # The constructor's own checks of kernel / cache_dequantized, on a throwaway meta layer.
    QuantLinear(1, 1, False, device="meta", **layer_kwargs)
    if importance is None:
        importance = {}
    if not isinstance(importance, Mapping):
        raise TypeError(
            f"importance must map layer names to tensors, got {type(importance).__name__}"
        )
    importance = dict(importance)
    for key, value in importance.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(
                f"importance must map layer names (str) to tensors, got {key!r}: "
                f"{type(value).__name__}"
            )
    if linear_weight(model) is not None:
        raise ValueError(
            f"model is itself a {type(model).__name__} layer: quantize_model replaces layers "
            "inside a model and cannot replace the object you hold; use "
            "QuantLinear.from_linear(model, spec), or wrap it (nn.Sequential(model))"
        )

    start = time.perf_counter()
    report = Report(
        parameters=sum(p.numel() for p in model.parameters()), bytes_before=model_bytes(model)
    )
    tied = _tied_owners(model)
    used_patterns: set[str] = set()
    rotation_notes: list[str] = []
    already: list[str] = []  # QuantLinear layers the rules select
    plan: list[tuple[str, nn.Module, torch.Tensor, tuple[QuantSpec, ...]]] = []
    for name, module in model.named_modules():
        weight = linear_weight(module)
        if weight is None and not isinstance(module, QuantLinear):
            if isinstance(module, nn.Linear):  # a subclass: it may read .weight itself
                report.layers.append(
                    LayerReport(
                        name,
                        tuple(module.weight.shape),
                        None,
                        _float_bits(module),
                        skipped=f"{type(module).__name__} (nn.Linear subclass)",
                    )
                )
            continue
        skip = None
        specs: tuple[QuantSpec, ...] = ()
        matched = [p for p in exclude if match_pattern(p, name)]
        used_patterns.update(matched)
        if matched:
            skip = "excluded"
        else:
            specs, skip, pattern = resolve_specs(name, rules)
            if pattern is not None:
                used_patterns.add(pattern)
        if isinstance(module, QuantLinear):
            if skip is None:
                already.append(name)
            report.layers.append(
                LayerReport(
                    name,
                    (module.out_features, module.in_features),
                    None,
                    module.quantized_weight.bits_per_weight,
                    skipped=f"already quantized ({module.spec.label})",
                )
            )
            continue
        shape = tuple(weight.shape)
        if skip is None and not quantize_tied and tied.get(name):
            skip = f"tied to {tied[name]}"
        if skip is None and weight.numel() == 0:
            # Nothing to store: a 0-bit row would only drag the report's averages.
            skip = "empty (no weights)"
        if skip is not None:
            report.layers.append(LayerReport(name, shape, None, _float_bits(module), skipped=skip))
            continue
        for spec in specs:
            if spec.rotation and name in importance:
                rotation_notes.append(
                    f"layer {name!r}: importance is not used with rotation (the rotated weights "
                    f"mix input features)"
                )
            if spec.rotation and hadamard_block(shape[1]) < MIN_USEFUL_HADAMARD:
                rotation_notes.append(
                    f"layer {name!r}: in_features {shape[1]} allows Hadamard blocks of only "
                    f"{hadamard_block(shape[1])}; the rotation does little there"
                )
        plan.append((name, module, weight, specs))

    _check_layers(plan, importance)
    if not plan and already:
        shown = ", ".join(repr(n) for n in already[:3]) + (", ..." if len(already) > 3 else "")
        raise ValueError(
            f"already quantized: {len(already)} QuantLinear layers the rules select ({shown}) "
            "and no float layer left to quantize. Quantizing again would compound the rounding "
            "error: load the float model to quantize it with other specs"
        )

    patterns = list(exclude) + (list(rules) if isinstance(rules, Mapping) else [])
    report.warnings = [
        f"pattern {p!r} matched no layer"
        for p in dict.fromkeys(patterns)
        if p not in used_patterns and p not in quiet
    ]
    report.warnings += list(dict.fromkeys(rotation_notes))
    # Importance for a layer kept float by a rule or exclude is expected (calibration measures
    # every layer); a name that is no linear layer at all is a mistake worth a warning.
    linear_names = {
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, QuantLinear)) or linear_weight(module) is not None
    }
    report.warnings += [
        f"importance for {name!r} is unused: the model has no Linear layer of that name"
        for name in importance
        if name not in linear_names
    ]

    # Quantize everything first and swap afterwards, so an error leaves the model untouched.
    replacements: list[tuple[str, QuantLinear]] = []
    mixed_sizes: list[tuple[str, list[_Tried], _Tried]] = []
    for name, module, weight, specs in bar(plan, "quantizing", unit="layer", progress=progress):
        weight = weight.detach()
        weights = importance.get(name)
        best_qt, best, best_key, tried = None, None, None, []
        for index, spec in enumerate(specs):
            qt = quantize(
                weight,
                spec,
                name=f"layer {name!r}",
                importance=weights if not spec.rotation else None,
            )
            restored = qt.dequantize(torch.float32)
            rel, sqnr = weight_error(weight, restored)
            weighted = None
            if weights is not None and len(specs) > 1:
                weighted = weight_error(weight, restored, importance=weights)[0]
            del restored
            row = _Tried(qt.spec.label, qt.bits_per_weight, rel, sqnr, weighted)
            tried.append(row)
            key = (_choice_score(row, choose), row.bits, index)
            if best_key is None or key < best_key:
                best_qt, best, best_key = qt, row, key
        qt = best_qt
        choice = candidates = None
        if len(specs) > 1:
            candidates = [
                {
                    "spec": t.label,
                    "bits_per_weight": t.bits,
                    "rel_error": t.rel,
                    "weighted_error": t.weighted,
                }
                for t in tried
            ]
            choice = _choice_text(tried, best, choose)
            if max(t.bits for t in tried) - min(t.bits for t in tried) > 1e-9:
                mixed_sizes.append((name, tried, best))
        bias = None if module.bias is None else module.bias.detach()
        layer = QuantLinear.from_quantized(qt, bias, **layer_kwargs)
        if bias is not None:
            layer.bias.requires_grad_(module.bias.requires_grad)
        report.layers.append(
            LayerReport(
                name,
                tuple(weight.shape),
                qt.spec.label,
                qt.bits_per_weight,
                best.rel,
                best.sqnr,
                config=qt.spec.to_dict(),
                code_entropy=qt.code_entropy(),
                choice=choice,
                candidates=candidates,
            )
        )
        replacements.append((name, layer))
    if mixed_sizes:
        report.warnings.append(_mixed_sizes_warning(mixed_sizes, choose))
    # A module registered under several names (reused) is replaced under all of them.
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    originals = {name: module for name, module, _, _ in plan}
    for name, layer in replacements:
        for path in paths[id(originals[name])]:
            set_submodule(model, path, layer)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.layers.sort(key=lambda r: order.get(r.name, len(order)))
    report.bytes_after = model_bytes(model)
    report.seconds = time.perf_counter() - start
    return report


def _check_layers(plan, importance: dict[str, torch.Tensor]) -> None:
    """Refuse, before anything is quantized, the selected layers that cannot be: weights on the
    meta device, of a non-float dtype, or holding NaN/Inf, and malformed importance."""
    meta = [
        name
        for name, module, weight, _ in plan
        if weight.is_meta or (module.bias is not None and module.bias.is_meta)
    ]
    if meta:
        shown = ", ".join(repr(n) for n in meta[:5]) + (
            f" and {len(meta) - 5} more" if len(meta) > 5 else ""
        )
        raise ValueError(
            f"layer{'s' * (len(meta) > 1)} {shown} {'are' if len(meta) > 1 else 'is'} on the meta "
            "device (no data, e.g. built under accelerate.init_empty_weights()): load real "
            "weights first (from_pretrained, or load_state_dict(..., assign=True))"
        )
    for name, _, weight, _ in plan:
        if weight.dtype not in FLOAT_DTYPES.values():
            raise TypeError(
                f"layer {name!r}: weight must be float32, float16 or bfloat16, got {weight.dtype}"
            )
    for name, _, weight, _ in plan:
        if not _all_finite(weight):
            raise ValueError(f"layer {name!r}: weight has NaN or Inf values")
    for name, _, weight, _ in plan:
        if name in importance:
            _check_importance(importance[name], weight, name)


def _all_finite(weight: torch.Tensor) -> bool:
    rows = max(1, _SCAN_ELEMENTS // max(1, weight.shape[1]))
    for r0 in range(0, weight.shape[0], rows):
        if not bool(torch.isfinite(weight[r0 : r0 + rows]).all()):
            return False
    return True


def _check_importance(weights: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    if not weights.is_floating_point():
        raise TypeError(f"layer {name!r}: importance must be a float tensor, got {weights.dtype}")
    if weights.is_meta:
        raise ValueError(f"layer {name!r}: importance is on the meta device (no data)")
    shape = tuple(weights.shape)
    if shape not in (tuple(weight.shape), (weight.shape[1],)):
        raise ValueError(
            f"layer {name!r}: importance has shape {list(shape)}; expected "
            f"[{weight.shape[1]}] (per input feature) or {list(weight.shape)}"
        )
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"layer {name!r}: importance must be finite and >= 0")


def _choice_score(row: _Tried, choose: str) -> float:
    if choose == "size_adjusted":
        # Each stored bit is worth halving the error (6.02 dB), so compare at equal size.
        return row.error * 2.0**row.bits
    return row.error


def _choice_text(tried: list[_Tried], best: _Tried, choose: str) -> str:
    weighted = best.weighted is not None
    metric = "importance-weighted error" if weighted else "error"
    rule = f"smallest {metric}"
    if choose == "size_adjusted":
        rule = f"smallest {metric} x 2^bits/weight (size-adjusted)"
    sizes = {round(t.bits, 9) for t in tried}
    note = "; candidates differ in size" if len(sizes) > 1 else ""
    listed = ", ".join(f"{t.label} {t.error:.4g} at {t.bits:.3f} b/w" for t in tried)
    return f"{best.label}: {rule} of {len(tried)}{note} ({listed})"


def _mixed_sizes_warning(mixed: list[tuple[str, list[_Tried], _Tried]], choose: str) -> str:
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


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``module``."""
    if not name:
        raise ValueError("set_submodule cannot replace the model itself (empty name)")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _float_bits(module: nn.Module) -> float:
    return float(module.weight.element_size() * 8)
