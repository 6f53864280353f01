"""`quantize_model`: replace the `nn.Linear` layers of any model by `QuantLinear`, by name rules.

`quantize_model` runs in named steps: check the arguments and rules (`check_rules`), plan which
layer gets which candidate specs and why the others are kept (`_plan`), quantize every selected
layer and compare its candidates (`_quantize_layers`), swap them all at once
(`lowbit.modules.replace_modules`), and finish the `Report`. Finding layers and matching names
is `lowbit.modules`' job; its names stay importable from here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.choice import (
    CHOICE_RULES,
    Tried,
    choice_score,
    choice_text,
    mixed_sizes_warning,
)
from lowbit.choice import weight_error as weight_error
from lowbit.dtypes import FLOAT_DTYPES
from lowbit.modules import check_pattern as check_pattern
from lowbit.modules import linear_weight as linear_weight
from lowbit.modules import match_pattern as match_pattern
from lowbit.modules import replace_modules, tied_owners
from lowbit.modules import set_submodule as set_submodule
from lowbit.nn import QuantLinear
from lowbit.progress import bar
from lowbit.quantize import quantize
from lowbit.report import LayerReport, Report
from lowbit.rotation import hadamard_block
from lowbit.rules import Rules, exclude_list, resolve_specs
from lowbit.rules import check_rules as check_rules
from lowbit.spec import QuantSpec

# Below this block size a Hadamard rotation mixes too few inputs to spread outliers.
MIN_USEFUL_HADAMARD = 16

# Weights scanned per step when checking for NaN/Inf up front: bounds the boolean temporary.
_SCAN_ELEMENTS = 1 << 22

# The keyword arguments quantize_model hands to every new QuantLinear.
LAYER_KWARGS = ("kernel", "cache_dequantized")

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
    exclude, quiet, importance = _check_arguments(
        model,
        rules,
        exclude,
        progress=progress,
        quantize_tied=quantize_tied,
        importance=importance,
        choose=choose,
        quiet_patterns=quiet_patterns,
        layer_kwargs=layer_kwargs,
    )
    start = time.perf_counter()
    report = Report(
        parameters=sum(p.numel() for p in model.parameters()), bytes_before=model_bytes(model)
    )
    plan = _plan(model, rules, exclude, importance, quantize_tied)
    _check_layers(plan.layers, importance)
    _refuse_all_already_quantized(plan)
    report.layers = list(plan.kept)
    report.warnings = _plan_warnings(model, rules, exclude, quiet, importance, plan)

    # Quantize everything first and swap afterwards, so an error leaves the model untouched.
    done = _quantize_layers(plan.layers, importance, choose, layer_kwargs, progress)
    report.layers += [d.row for d in done]
    mixed_sizes = [(d.name, d.tried, d.best) for d in done if d.mixed_sizes]
    if mixed_sizes:
        report.warnings.append(mixed_sizes_warning(mixed_sizes, choose))
    # A module registered under several names (reused) is replaced under all of them.
    replace_modules(model, {d.name: d.layer for d in done})
    _finish_report(report, model, start)
    return report


# --- checking the arguments -------------------------------------------------------------------


def _check_arguments(
    model,
    rules: Rules,
    exclude,
    *,
    progress,
    quantize_tied,
    importance,
    choose,
    quiet_patterns,
    layer_kwargs,
) -> tuple[list[str], set[str], dict[str, torch.Tensor]]:
    """Every check of `quantize_model`'s arguments that needs no layer's weights, in the order
    the errors are documented; returns (exclude patterns, quiet patterns, importance dict)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_rules(rules, ())
    exclude = exclude_list(exclude)
    quiet = _quiet_set(quiet_patterns)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")
    if not isinstance(quantize_tied, bool):
        raise TypeError(f"quantize_tied must be a bool, got {quantize_tied!r}")
    if choose not in CHOICE_RULES:
        raise ValueError(f"choose must be one of {CHOICE_RULES}, got {choose!r}")
    _check_layer_kwargs(layer_kwargs)
    importance = _importance_dict(importance)
    if linear_weight(model) is not None:
        raise ValueError(
            f"model is itself a {type(model).__name__} layer: quantize_model replaces layers "
            "inside a model and cannot replace the object you hold; use "
            "QuantLinear.from_linear(model, spec), or wrap it (nn.Sequential(model))"
        )
    return exclude, quiet, importance


def _quiet_set(quiet_patterns) -> set[str]:
    """``quiet_patterns`` as a set of str (one str is one pattern)."""
    if isinstance(quiet_patterns, str):
        quiet_patterns = [quiet_patterns]
    if not isinstance(quiet_patterns, Iterable):
        raise TypeError(f"quiet_patterns must be a list of patterns, got {quiet_patterns!r}")
    quiet = set(quiet_patterns)
    if not all(isinstance(p, str) for p in quiet):
        raise TypeError(f"quiet_patterns must be a list of str, got {sorted(quiet, key=str)!r}")
    return quiet


def _check_layer_kwargs(layer_kwargs: dict) -> None:
    """Refuse keyword arguments `QuantLinear` does not take, or values it refuses."""
    unknown = sorted(set(layer_kwargs) - set(LAYER_KWARGS))
    if unknown:
        raise TypeError(
            f"quantize_model got unexpected keyword argument(s) {unknown}; the ones passed to "
            f"QuantLinear are {list(LAYER_KWARGS)}"
        )
    # The constructor's own checks of kernel / cache_dequantized, on a throwaway meta layer.
    QuantLinear(1, 1, False, device="meta", **layer_kwargs)


def _importance_dict(importance) -> dict[str, torch.Tensor]:
    """``importance`` as a dict of layer name -> tensor (``None``: empty); TypeError if not."""
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
    return importance


# --- planning ---------------------------------------------------------------------------------


@dataclass
class _Layer:
    """A layer selected for quantization: its module, ``[out, in]`` weight and candidates."""

    name: str
    module: nn.Module
    weight: torch.Tensor
    specs: tuple[QuantSpec, ...]


@dataclass
class _Plan:
    """What `quantize_model` will do, decided before any weight is quantized."""

    layers: list[_Layer] = field(default_factory=list)
    kept: list[LayerReport] = field(default_factory=list)  # rows of layers left as they are
    used_patterns: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)  # rotation that does little or drops importance
    already: list[str] = field(default_factory=list)  # QuantLinear layers the rules select


def _plan(model: nn.Module, rules: Rules, exclude: list[str], importance, quantize_tied) -> _Plan:
    """Walk ``model``'s layers: which get which candidate specs, and why the others are kept."""
    plan = _Plan()
    tied = tied_owners(model)
    for name, module in model.named_modules():
        weight = linear_weight(module)
        if weight is None and not isinstance(module, QuantLinear):
            if isinstance(module, nn.Linear):  # a subclass: it may read .weight itself
                plan.kept.append(_subclass_row(name, module))
            continue
        specs, skip = _select(name, rules, exclude, plan.used_patterns)
        if isinstance(module, QuantLinear):
            if skip is None:
                plan.already.append(name)
            plan.kept.append(_already_quantized_row(name, module))
            continue
        if skip is None:
            skip = _kept_reason(name, weight, tied, quantize_tied)
        if skip is not None:
            plan.kept.append(
                LayerReport(name, tuple(weight.shape), None, _float_bits(module), skipped=skip)
            )
            continue
        plan.notes += _rotation_notes(name, tuple(weight.shape), specs, importance)
        plan.layers.append(_Layer(name, module, weight, specs))
    return plan


def _select(
    name: str, rules: Rules, exclude: list[str], used: set[str]
) -> tuple[tuple[QuantSpec, ...], str | None]:
    """(candidate specs, reason kept float) for layer ``name``; adds the patterns that matched
    to ``used``."""
    matched = [p for p in exclude if match_pattern(p, name)]
    used.update(matched)
    if matched:
        return (), "excluded"
    specs, skip, pattern = resolve_specs(name, rules)
    if pattern is not None:
        used.add(pattern)
    return specs, skip


def _kept_reason(
    name: str, weight: torch.Tensor, tied: dict[str, str], quantize_tied: bool
) -> str | None:
    """Why a layer the rules select stays float anyway (tied, empty), or None."""
    if not quantize_tied and tied.get(name):
        return f"tied to {tied[name]}"
    if weight.numel() == 0:
        # Nothing to store: a 0-bit row would only drag the report's averages.
        return "empty (no weights)"
    return None


def _subclass_row(name: str, module: nn.Linear) -> LayerReport:
    return LayerReport(
        name,
        tuple(module.weight.shape),
        None,
        _float_bits(module),
        skipped=f"{type(module).__name__} (nn.Linear subclass)",
    )


def _already_quantized_row(name: str, module: QuantLinear) -> LayerReport:
    return LayerReport(
        name,
        (module.out_features, module.in_features),
        None,
        module.quantized_weight.bits_per_weight,
        skipped=f"already quantized ({module.spec.label})",
    )


def _rotation_notes(name: str, shape: tuple[int, ...], specs, importance) -> list[str]:
    """Warnings for rotated candidates of layer ``name`` (weight ``shape`` ``(out, in)``)."""
    notes = []
    for spec in specs:
        if spec.rotation and name in importance:
            notes.append(
                f"layer {name!r}: importance is not used with rotation (the rotated weights "
                f"mix input features)"
            )
        if spec.rotation and hadamard_block(shape[1]) < MIN_USEFUL_HADAMARD:
            notes.append(
                f"layer {name!r}: in_features {shape[1]} allows Hadamard blocks of only "
                f"{hadamard_block(shape[1])}; the rotation does little there"
            )
    return notes


def _refuse_all_already_quantized(plan: _Plan) -> None:
    """Quantizing only QuantLinear layers again is an error, not an empty report."""
    if plan.layers or not plan.already:
        return
    already = plan.already
    shown = ", ".join(repr(n) for n in already[:3]) + (", ..." if len(already) > 3 else "")
    raise ValueError(
        f"already quantized: {len(already)} QuantLinear layers the rules select ({shown}) "
        "and no float layer left to quantize. Quantizing again would compound the rounding "
        "error: load the float model to quantize it with other specs"
    )


def _plan_warnings(model, rules: Rules, exclude, quiet, importance, plan: _Plan) -> list[str]:
    """Patterns that matched nothing, rotation notes, and importance for no linear layer."""
    patterns = list(exclude) + (list(rules) if isinstance(rules, Mapping) else [])
    warnings = [
        f"pattern {p!r} matched no layer"
        for p in dict.fromkeys(patterns)
        if p not in plan.used_patterns and p not in quiet
    ]
    warnings += list(dict.fromkeys(plan.notes))
    # Importance for a layer kept float by a rule or exclude is expected (calibration measures
    # every layer); a name that is no linear layer at all is a mistake worth a warning.
    linear_names = {
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, QuantLinear)) or linear_weight(module) is not None
    }
    warnings += [
        f"importance for {name!r} is unused: the model has no Linear layer of that name"
        for name in importance
        if name not in linear_names
    ]
    return warnings


# --- quantizing -------------------------------------------------------------------------------


@dataclass
class _Done:
    """A quantized layer, not yet swapped in: the new layer, its report row, its candidates."""

    name: str
    layer: QuantLinear
    row: LayerReport
    tried: list[Tried]
    best: Tried

    @property
    def mixed_sizes(self) -> bool:
        """Whether the candidates differed in stored bits/weight."""
        bits = [t.bits for t in self.tried]
        return len(bits) > 1 and max(bits) - min(bits) > 1e-9


def _quantize_layers(
    layers: list[_Layer], importance, choose, layer_kwargs, progress
) -> list[_Done]:
    """Quantize every planned layer (best candidate kept); nothing is swapped here."""
    return [
        _quantize_layer(layer, importance.get(layer.name), choose, layer_kwargs)
        for layer in bar(layers, "quantizing", unit="layer", progress=progress)
    ]


def _quantize_layer(planned: _Layer, weights, choose: str, layer_kwargs) -> _Done:
    """Quantize one layer with each candidate spec and build its `QuantLinear` from the best.

    ``weights``: the layer's importance (``[in]`` or ``[out, in]``) or None.
    """
    name, module, weight = planned.name, planned.module, planned.weight.detach()
    qt, best, tried = _best_candidate(name, weight, planned.specs, weights, choose)
    choice = candidates = None
    if len(tried) > 1:
        candidates = [
            {
                "spec": t.label,
                "bits_per_weight": t.bits,
                "rel_error": t.rel,
                "weighted_error": t.weighted,
            }
            for t in tried
        ]
        choice = choice_text(tried, best, choose)
    bias = None if module.bias is None else module.bias.detach()
    layer = QuantLinear.from_quantized(qt, bias, **layer_kwargs)
    if bias is not None:
        layer.bias.requires_grad_(module.bias.requires_grad)
    row = LayerReport(
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
        kernel=_kernel_name(layer),
    )
    return _Done(name, layer, row, tried, best)


def _kernel_name(layer: QuantLinear) -> str:
    """The paths ``layer``'s forward takes on its device, by batch size (`Plan.summary`)."""
    return layer.plan().summary()


def _best_candidate(name: str, weight: torch.Tensor, specs, weights, choose: str):
    """(QuantizedTensor, its measures, every candidate's measures) of the chosen spec.

    Ties go to the smaller, then the earlier candidate.
    """
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
        row = Tried(qt.spec.label, qt.bits_per_weight, rel, sqnr, weighted)
        tried.append(row)
        key = (choice_score(row, choose), row.bits, index)
        if best_key is None or key < best_key:
            best_qt, best, best_key = qt, row, key
    return best_qt, best, tried


# --- the report (after the swap) --------------------------------------------------------------


def _finish_report(report: Report, model: nn.Module, start: float) -> None:
    """Rows in the model's order, the size after the swap, and the time taken."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.layers.sort(key=lambda r: order.get(r.name, len(order)))
    report.bytes_after = model_bytes(model)
    report.seconds = time.perf_counter() - start


def _check_layers(layers: list[_Layer], importance: dict[str, torch.Tensor]) -> None:
    """Refuse, before anything is quantized, the selected layers that cannot be: weights on the
    meta device, of a non-float dtype, or holding NaN/Inf, and malformed importance."""
    meta = [
        layer.name
        for layer in layers
        if layer.weight.is_meta or (layer.module.bias is not None and layer.module.bias.is_meta)
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
    for layer in layers:
        if layer.weight.dtype not in FLOAT_DTYPES.values():
            raise TypeError(
                f"layer {layer.name!r}: weight must be float32, float16 or bfloat16, "
                f"got {layer.weight.dtype}"
            )
    for layer in layers:
        if not _all_finite(layer.weight):
            raise ValueError(f"layer {layer.name!r}: weight has NaN or Inf values")
    for layer in layers:
        if layer.name in importance:
            _check_importance(importance[layer.name], layer.weight, layer.name)


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


def _float_bits(module: nn.Module) -> float:
    return float(module.weight.element_size() * 8)
