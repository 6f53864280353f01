"""`quantize_model`: replace the `nn.Linear` layers of any model by `QuantLinear`, by name rules."""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.nn import QuantLinear
from lowbit.quantize import quantize
from lowbit.report import LayerReport, Report
from lowbit.rotation import hadamard_block
from lowbit.spec import QuantSpec

# Below this block size a Hadamard rotation mixes too few inputs to spread outliers.
MIN_USEFUL_HADAMARD = 16

Rules = QuantSpec | Mapping[str, "QuantSpec | None | Sequence[QuantSpec]"]


def match_pattern(pattern: str, name: str) -> bool:
    """Whether module ``name`` matches ``pattern``: a glob (``*.mlp.*``) or ``re:<regex>``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def resolve_specs(name: str, rules: Rules) -> tuple[tuple[QuantSpec, ...], str | None, str | None]:
    """(candidate specs, reason kept float, matching pattern) for module ``name``.

    The first matching rule wins; its value is a spec, ``None`` (keep float) or a list of specs
    (candidates: the one with the smallest error is kept).
    """
    if isinstance(rules, QuantSpec):
        return (rules,), None, None
    for pattern, value in rules.items():
        if match_pattern(pattern, name):
            if value is None:
                return (), f"rule {pattern!r}", pattern
            specs = (value,) if isinstance(value, QuantSpec) else tuple(value)
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
    exclude: Iterable[str] = (),
    *,
    progress: bool = True,
    quantize_tied: bool = False,
    importance: Mapping[str, torch.Tensor] | None = None,
    **layer_kwargs,
) -> Report:
    """Quantize every `nn.Linear` of ``model`` in place, choosing a spec per layer by name.

    Args:
        model: any module; its `nn.Linear` children at any depth are replaced by `QuantLinear`.
        rules: one `QuantSpec` for all layers, or ``{pattern: spec | None | [spec, ...]}``:
            patterns are globs on the full module name (``"*.mlp.down_proj"``) or
            ``"re:<regex>"``; the first match wins; ``None`` keeps the layer in full precision;
            a list of specs is a set of candidates, and the one with the smallest relative error
            is kept (the report shows the choice); unmatched layers stay float.
        exclude: patterns of layers to keep in full precision whatever the rules say.
        progress: show a tqdm bar over layers.
        quantize_tied: also quantize layers whose weight is tied to another module (an
            ``lm_head`` sharing the embedding, say); off by default, since the float tensor
            stays for the other module and quantizing then makes the model larger.
        importance: ``{layer name: weights}`` for the searching fits (``mse``, ``hqq``,
            ``entropy``): ``[in_features]`` or the weight's shape, e.g. from
            `lowbit.calibrate.input_importance`. Layers not named are fitted unweighted.
        **layer_kwargs: passed to `QuantLinear` (``kernel``, ``cache_dequantized``).

    Returns:
        A `Report` (per layer: name, shape, spec, bits/weight, relative Frobenius error, SQNR).

    Raises:
        ValueError: a weight has NaN/Inf; the message names the layer. The model is left
            untouched. (A group size that does not divide ``in_features`` is fine: each row's
            last group is partial.)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(rules, (QuantSpec, Mapping)):
        raise TypeError(
            f"rules must be a QuantSpec or a dict of pattern -> spec, got {type(rules).__name__}"
        )
    if isinstance(rules, Mapping):
        for pattern, value in rules.items():
            candidates = [value] if value is None or isinstance(value, QuantSpec) else value
            ok = isinstance(pattern, str) and isinstance(candidates, (list, tuple))
            ok = ok and all(c is None or isinstance(c, QuantSpec) for c in candidates)
            if not ok or (len(candidates) != 1 and None in candidates) or not candidates:
                raise TypeError(
                    f"rules entry {pattern!r}: expected str -> QuantSpec, None or a non-empty "
                    "list of QuantSpec"
                )
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(exclude, Iterable) or not all(isinstance(p, str) for p in exclude):
        raise TypeError(f"exclude must be a list of name patterns, got {exclude!r}")
    exclude = list(exclude)
    importance = dict(importance or {})
    if not all(isinstance(v, torch.Tensor) for v in importance.values()):
        raise TypeError("importance must map layer names to tensors")
    start = time.perf_counter()
    report = Report(
        parameters=sum(p.numel() for p in model.parameters()), bytes_before=model_bytes(model)
    )

    tied = _tied_owners(model)
    used_patterns: set[str] = set()
    rotation_notes: list[str] = []
    plan: list[tuple[str, nn.Module, torch.Tensor, tuple[QuantSpec, ...]]] = []
    for name, module in model.named_modules():
        weight = linear_weight(module)
        if weight is None:
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
        shape = tuple(weight.shape)
        skip = None
        matched = [p for p in exclude if match_pattern(p, name)]
        used_patterns.update(matched)
        if matched:
            skip = "excluded"
        else:
            specs, skip, pattern = resolve_specs(name, rules)
            if pattern is not None:
                used_patterns.add(pattern)
            if skip is None and not quantize_tied and tied.get(name):
                skip = f"tied to {tied[name]}"
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
    patterns = list(exclude) + (list(rules) if isinstance(rules, Mapping) else [])
    report.warnings = [
        f"pattern {p!r} matched no layer" for p in patterns if p not in used_patterns
    ]
    report.warnings += list(dict.fromkeys(rotation_notes))
    # Importance for a layer kept float by a rule or exclude is expected (calibration measures
    # every layer); a name that is no Linear layer at all is a mistake worth a warning.
    linear_names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    linear_names |= {row.name for row in report.layers}
    report.warnings += [
        f"importance for {name!r} is unused: the model has no Linear layer of that name"
        for name in importance
        if name not in linear_names
    ]

    # Quantize everything first and swap afterwards, so an error leaves the model untouched.
    replacements: list[tuple[str, QuantLinear]] = []
    for name, module, weight, specs in tqdm(
        plan, desc="quantizing", unit="layer", disable=not progress
    ):
        best = None
        for spec in specs:  # several candidates: keep the one with the smallest error
            qt = quantize(
                weight.detach(),
                spec,
                name=f"layer {name!r}",
                importance=importance.get(name) if not spec.rotation else None,
            )
            rel, sqnr = weight_error(weight.detach(), qt.dequantize(torch.float32))
            if best is None or rel < best[1]:
                best = (qt, rel, sqnr)
        qt, rel, sqnr = best
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
                rel,
                sqnr,
                config=qt.spec.to_dict(),
                code_entropy=qt.code_entropy(),
            )
        )
        replacements.append((name, layer))
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


def weight_error(weight: torch.Tensor, restored: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, SQNR in dB) of ``restored`` against ``weight``."""
    w = weight.to(torch.float32)
    err = (w - restored.to(torch.float32)).norm().item()
    ref = w.norm().item()
    if ref == 0.0:
        return (0.0 if err == 0.0 else float("inf")), (
            float("inf") if err == 0.0 else float("-inf")
        )
    if err == 0.0:
        return 0.0, float("inf")
    rel = err / ref
    return rel, -20.0 * torch.log10(torch.tensor(rel)).item()


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _float_bits(module: nn.Linear) -> float:
    return float(module.weight.element_size() * 8)
