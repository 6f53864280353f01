"""Calibration: how much each input feature of each Linear layer matters, from real activations.

The searching fits (``mse``, ``hqq``, ``entropy``) minimise ``sum(importance * (w - w_hat)**2)``.
With ``importance[j] = E[x_j**2]``, the mean squared activation of input feature ``j``, that sum
is the expected squared error of the layer's *output* when features are uncorrelated: errors
on weights that meet large activations count more (the diagonal of the Hessian that GPTQ uses in
full).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources

import torch
from torch import nn

from lowbit.modules import linear_weight
from lowbit.progress import bar


def input_importance(
    model: nn.Module,
    batches: Iterable,
    *,
    layers: Iterable[str] | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Mean squared input activation per feature of every Linear layer, over ``batches``.

    Args:
        model: any module; its `nn.Linear` (and Hugging Face ``Conv1D``) layers are observed.
        batches: model inputs: tensors (passed as ``model(batch)``) or dicts (``model(**batch)``).
        layers: names of the layers to observe (default: all).
        progress: a bar over the batches (``None``: on a terminal, once it lasts 2 s).

    Returns:
        ``{layer name: float32 [in_features]}``, on the CPU, for `quantize_model`'s
        ``importance``. Each is scaled to mean 1 (only relative sizes matter to the fits).

    Raises:
        ValueError: ``batches`` is empty, or the activations hold NaN/Inf.
    """
    wanted = None if layers is None else set(layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def observe(name):
        def hook(module, args):
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
            sq = (flat * flat).sum(0)
            sums[name] = sq if name not in sums else sums[name] + sq
            counts[name] = counts.get(name, 0) + flat.shape[0]

        return hook

    for name, module in model.named_modules():
        if linear_weight(module) is None or (wanted is not None and name not in wanted):
            continue
        hooks.append(module.register_forward_pre_hook(observe(name)))
    seen = 0
    try:
        with torch.inference_mode():
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in bar(batches, "calibrating", total=total, unit="batch", progress=progress):
                if isinstance(batch, dict):
                    model(**batch)
                else:
                    model(batch)
                seen += 1
    finally:
        for hook in hooks:
            hook.remove()
    if not seen:
        raise ValueError("batches is empty: calibration needs at least one batch")
    result = {}
    for name, total in sums.items():
        mean = total / max(1, counts[name])
        if not torch.isfinite(mean).all():
            raise ValueError(f"layer {name!r}: calibration activations hold NaN or Inf")
        level = mean.mean()
        result[name] = (mean / level if level > 0 else torch.ones_like(mean)).cpu()
    return result


def shakespeare_text() -> str:
    """Tiny Shakespeare (vendored with its SOURCE.txt): the default calibration text, disjoint
    from the WikiText-2 test split used for evaluation."""
    return resources.files("lowbit.data").joinpath("tinyshakespeare.txt").read_text("utf-8")


def calibration_batches(tokenizer, windows: int = 16, seq_len: int = 512) -> list[dict]:
    """``windows`` consecutive token windows of Tiny Shakespeare, as ``{"input_ids": [1, L]}``.

    Raises:
        ValueError: ``windows`` or ``seq_len`` below 1, or more tokens asked than the text has.
    """
    if windows < 1 or seq_len < 1:
        raise ValueError(f"windows and seq_len must be >= 1, got {windows}, {seq_len}")
    text = shakespeare_text()
    needed = windows * seq_len
    ids = tokenizer(text[: needed * 8], add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        raise ValueError(f"Tiny Shakespeare has {len(ids)} tokens, {needed} requested")
    tokens = torch.tensor(ids[:needed], dtype=torch.long).view(windows, seq_len)
    return [{"input_ids": row.unsqueeze(0)} for row in tokens]
