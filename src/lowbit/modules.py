"""Finding and replacing layers of a model: linear layers and their weights, tied and shared
modules, name patterns, and swapping modules under every name they are registered at.

Knows PyTorch modules only (no lowbit layer types), so every part of lowbit that walks a model
(`lowbit.model`, `lowbit.calibrate`, `lowbit.io.checkpoint`, `lowbit.compat`) can use it.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Mapping

import torch
from torch import nn


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``[out, in]`` weight of a layer computing ``x @ W.T + b``, or None.

    Plain `nn.Linear` (its ``weight``), and Hugging Face's ``Conv1D`` (GPT-2 family; it stores
    ``W.T`` as ``[in, out]``, returned transposed: a view, same dtype and storage). Subclasses
    of `nn.Linear` are not taken: their forward may use ``.weight`` directly.
    """
    if type(module) is nn.Linear:
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t()
    return None


def tied_owners(model: nn.Module) -> dict[str, str]:
    """``{linear layer name: name of another module holding its weight's storage}``.

    Only modules that are not linear layers count as owners (an embedding tied to ``lm_head``,
    say): linear layers sharing a weight are quantized together. Weights on the ``meta`` device
    have no storage to compare and are never tied.
    """
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


def _all_names(model: nn.Module) -> dict[int, list[str]]:
    """``{id(module): every name it is registered under}``, in `named_modules` order (its first
    name is the one `named_modules` gives)."""
    names: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(path)
    return names


def other_names(model: nn.Module) -> dict[str, list[str]]:
    """``{name: the other names of the same module}`` for modules registered under several
    names (a layer reused in two places), keyed by the name `named_modules` gives."""
    return {names[0]: names[1:] for names in _all_names(model).values() if len(names) > 1}


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


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``module`` (that name only)."""
    if not name:
        raise ValueError("set_submodule cannot replace the model itself (empty name)")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_modules(
    model: nn.Module,
    replacements: Mapping[str, nn.Module],
    *,
    skip: Callable[[str], bool] | None = None,
    every_name: bool = True,
) -> None:
    """Swap submodules of ``model`` in place: ``{name: new module}``.

    A module registered under several names (a layer reused in two places) is replaced under
    all of them by the same new module, so it stays shared. Every name is checked before any
    module is swapped: on an error ``model`` is unchanged.

    Args:
        model: the model to modify.
        replacements: dotted module names (as `named_modules` gives them, or any other name of
            the same module) -> the module to put there.
        skip: names under which a shared module is left as it is (``skip(name)`` true), even
            though it is replaced under its other names.
        every_name: replace a shared module under all its names (default). ``False``: under
            the given names only, each by its own replacement (a checkpoint's manifest lists
            every name a saved layer had, whatever the model being loaded into shares).

    Raises:
        TypeError: a name is not a str, or a replacement is not an ``nn.Module``.
        ValueError: a name is empty (the model itself cannot be replaced in place) or names no
            module of ``model``; with ``every_name``, two names of one shared module get
            different modules.
    """
    targets: dict[int, nn.Module] = {}
    for name, new in replacements.items():
        original = _submodule(model, name)
        if not isinstance(new, nn.Module):
            raise TypeError(
                f"replacement for {name!r} must be an nn.Module, got {type(new).__name__}"
            )
        if every_name and targets.get(id(original), new) is not new:
            raise ValueError(
                f"module {name!r} is shared with another name given a different replacement"
            )
        targets[id(original)] = new
    if not every_name:
        for name, new in replacements.items():
            set_submodule(model, name, new)
        return
    # All names are listed before the first swap, which changes what the walk would find.
    names = _all_names(model)
    for key, new in targets.items():
        for path in names[key]:
            if skip is None or not skip(path):
                set_submodule(model, path, new)


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """The module at ``name``, or an error naming it (the root is not replaceable)."""
    if not isinstance(name, str):
        raise TypeError(f"module names must be str, got {name!r}")
    if not name:
        raise ValueError("cannot replace the model itself (empty name)")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no module named {name!r}") from None
