"""`quantize_model`: replace the `nn.Linear` layers of any model by `QuantLinear`, by name rules."""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.nn import QuantLinear
from lowbit.report import LayerReport, Report
from lowbit.spec import QuantSpec

Rules = QuantSpec | Mapping[str, QuantSpec | None]


def match_pattern(pattern: str, name: str) -> bool:
    """Whether module ``name`` matches ``pattern``: a glob (``*.mlp.*``) or ``re:<regex>``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def resolve_spec(name: str, rules: Rules) -> tuple[QuantSpec | None, str | None]:
    """(spec, reason kept float) for module ``name``: first matching rule wins."""
    if isinstance(rules, QuantSpec):
        return rules, None
    for pattern, spec in rules.items():
        if match_pattern(pattern, name):
            return (spec, None) if spec is not None else (None, f"rule {pattern!r}")
    return None, "no rule"


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
    **layer_kwargs,
) -> Report:
    """Quantize every `nn.Linear` of ``model`` in place, choosing a spec per layer by name.

    Args:
        model: any module; its `nn.Linear` children at any depth are replaced by `QuantLinear`.
        rules: one `QuantSpec` for all layers, or ``{pattern: spec or None}``: patterns are globs
            on the full module name (``"*.mlp.down_proj"``) or ``"re:<regex>"``; the first match
            wins; ``None`` keeps the layer in full precision; unmatched layers stay float.
        exclude: patterns of layers to keep in full precision whatever the rules say.
        progress: show a tqdm bar over layers.
        **layer_kwargs: passed to `QuantLinear` (``kernel``, ``cache_dequantized``).

    Returns:
        A `Report` (per layer: name, shape, spec, bits/weight, relative Frobenius error, SQNR).

    Raises:
        ValueError: a weight has NaN/Inf, or a group size does not divide a layer's
            ``in_features``; the message names the layer. The model is left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(rules, (QuantSpec, Mapping)):
        raise TypeError(
            f"rules must be a QuantSpec or a dict of pattern -> spec, got {type(rules).__name__}"
        )
    if isinstance(rules, Mapping):
        for pattern, spec in rules.items():
            if not isinstance(pattern, str) or not (spec is None or isinstance(spec, QuantSpec)):
                raise TypeError(f"rules entry {pattern!r}: expected str -> QuantSpec or None")
    if isinstance(exclude, str):
        exclude = [exclude]
    exclude = list(exclude)
    start = time.perf_counter()
    report = Report(
        parameters=sum(p.numel() for p in model.parameters()), bytes_before=model_bytes(model)
    )

    plan: list[tuple[str, nn.Linear, QuantSpec]] = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        shape = tuple(module.weight.shape)
        if any(match_pattern(p, name) for p in exclude):
            report.layers.append(
                LayerReport(name, shape, None, _float_bits(module), skipped="excluded")
            )
            continue
        spec, reason = resolve_spec(name, rules)
        if spec is None:
            report.layers.append(
                LayerReport(name, shape, None, _float_bits(module), skipped=reason)
            )
            continue
        if spec.granularity == "group" and module.in_features % spec.group_size:
            raise ValueError(
                f"layer {name!r}: in_features {module.in_features} not divisible by "
                f"group_size {spec.group_size}"
            )
        plan.append((name, module, spec))

    # Quantize everything first and swap afterwards, so an error leaves the model untouched.
    replacements: list[tuple[str, QuantLinear]] = []
    for name, module, spec in tqdm(plan, desc="quantizing", unit="layer", disable=not progress):
        layer = QuantLinear.from_linear(module, spec, name=f"layer {name!r}", **layer_kwargs)
        rel, sqnr = weight_error(module.weight.detach(), layer.dequantize_weight(torch.float32))
        report.layers.append(
            LayerReport(
                name,
                tuple(module.weight.shape),
                spec.label,
                layer.quantized_weight.bits_per_weight,
                rel,
                sqnr,
            )
        )
        replacements.append((name, layer))
    # A module registered under several names (reused) is replaced under all of them.
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    originals = {name: module for name, module, _ in plan}
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
