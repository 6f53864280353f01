"""`save` / `load`: a quantized model as ``model.safetensors`` + ``lowbit.json``.

Layout of a saved directory::

    lowbit.json         format, version, per-layer specs, tied-tensor aliases, sha256 of the tensors
    model.safetensors   every tensor of the state dict (quantized buffers and float parameters)
    ...                 extra files the caller adds (a Hugging Face config and tokenizer, say)

Writes go to a temporary sibling directory that is renamed into place at the end, so a failed
save leaves nothing behind. Loading reads JSON and safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.model import linear_weight, set_submodule
from lowbit.nn import QuantLinear
from lowbit.spec import QuantSpec
from lowbit.tensor import DTYPE_NAMES, FLOAT_DTYPES

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 1
MANIFEST = "lowbit.json"
TENSORS = "model.safetensors"


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    metadata: dict | None = None,
    write_extra: Callable[[Path], None] | None = None,
    overwrite: bool = True,
) -> Path:
    """Save ``model`` (quantized or not) to ``directory`` atomically.

    Args:
        model: a model whose `QuantLinear` layers (and everything else in its state dict) are saved.
        directory: created (or replaced when ``overwrite``) only once everything is written.
        metadata: JSON-able information stored under ``"metadata"`` in the manifest.
        write_extra: called with the temporary directory to add files (configs, tokenizers).
        overwrite: replace an existing directory, but only an empty one or one that `save`
            wrote (it holds ``lowbit.json``): anything else (a source model, say) is an error.

    Returns:
        The directory's path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    target = Path(directory)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise FileExistsError(
            f"{str(target)!r} exists and is not a lowbit checkpoint; refusing to replace it"
        )
    if target.exists() and not target.is_dir():
        raise ValueError(f"directory {str(target)!r} exists and is not a directory")
    state, aliases = _dedup_state(model.state_dict())
    layers = {
        name: {
            "spec": module.spec.to_dict(),
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "dtype": DTYPE_NAMES[module.weight_dtype],
        }
        for name, module in model.named_modules()
        if isinstance(module, QuantLinear)
    }
    # A layer registered under several names is stored once; the other names are recorded.
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantLinear) and path not in layers:
            first = next(n for n, m in model.named_modules() if m is module)
            layers[first].setdefault("also_at", []).append(path)
    created = _make_parents(target.parent)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        # mkdtemp makes the folder private (0700); a saved model should be as readable as any.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        tensors_path = tmp / TENSORS
        save_file(state, str(tensors_path), metadata={"format": FORMAT_NAME})
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tensors_file": TENSORS,
            "sha256": _sha256(tensors_path),
            "layers": layers,
            "aliases": aliases,
            "metadata": metadata or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if write_extra is not None:
            write_extra(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return target


def read_manifest(directory: str | os.PathLike) -> dict:
    """The parsed ``lowbit.json`` of a saved directory, checked for format and version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no lowbit manifest at {str(path)!r}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{str(path)!r} is not a lowbit manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format_version {manifest.get('format_version')!r}; "
            f"this lowbit reads {FORMAT_VERSION}"
        )
    for key in ("tensors_file", "sha256", "layers", "aliases"):
        if key not in manifest:
            raise ValueError(f"{str(path)!r} lacks the {key!r} entry")
    return manifest


def load(directory: str | os.PathLike, model: nn.Module, *, verify: bool = True) -> nn.Module:
    """Restore a saved model into ``model``, a freshly built model of the same architecture.

    Each `nn.Linear` named in the manifest is swapped for a `QuantLinear` of the saved spec,
    then the whole state dict is loaded (``assign=True``, so a skeleton whose parameters are on
    the ``meta`` device works too). The round trip is bit-exact.

    Args:
        directory: what `save` wrote.
        model: the skeleton; modified in place and returned.
        verify: check the tensors file's sha256 against the manifest (catches corruption).

    Raises:
        FileNotFoundError: manifest or tensors file missing (the message names it).
        ValueError: corrupted/truncated file, or a layer or tensor that does not match ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    directory = Path(directory)
    manifest = read_manifest(directory)
    tensors_path = directory / manifest["tensors_file"]
    if not tensors_path.is_file():
        raise FileNotFoundError(f"tensors file {str(tensors_path)!r} is missing")
    if verify and _sha256(tensors_path) != manifest["sha256"]:
        raise ValueError(
            f"{str(tensors_path)!r} is corrupted: its sha256 does not match the manifest"
        )
    try:
        state = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(tensors_path)!r}: {err}") from None
    for alias, source in manifest["aliases"].items():
        if source not in state:
            raise ValueError(
                f"{str(tensors_path)!r}: alias {alias!r} points to missing tensor {source!r}"
            )
        state[alias] = state[source]

    new_layers: dict[str, QuantLinear] = {}
    for name, info in manifest["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"layer {name!r} of {str(directory)!r} does not exist in the model"
            ) from None
        weight = linear_weight(module)
        if isinstance(module, QuantLinear):
            shape = (module.out_features, module.in_features)
        elif weight is not None:
            shape = tuple(weight.shape)
        else:
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, expected nn.Linear")
        if shape != (info["out_features"], info["in_features"]):
            raise ValueError(
                f"layer {name!r}: saved shape [{info['out_features']}, {info['in_features']}] "
                f"does not match the model's {list(shape)}"
            )
        new_layers[name] = QuantLinear(
            info["in_features"],
            info["out_features"],
            info["bias"],
            QuantSpec.from_dict(info["spec"]),
            dtype=FLOAT_DTYPES[info["dtype"]],
            device="meta",
        )
    # Check every tensor against the model as it will be before touching it, so a file that
    # does not fit leaves the skeleton unchanged.
    also_at = {name: info.get("also_at", []) for name, info in manifest["layers"].items()}
    _check_fit(model, new_layers, state, tensors_path, also_at)
    for name, layer in new_layers.items():
        for path in [name, *manifest["layers"][name].get("also_at", [])]:
            set_submodule(model, path, layer)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{str(tensors_path)!r} does not fit the model: {err}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{str(tensors_path)!r} does not fit the model: "
            f"missing tensors {result.missing_keys[:5]}, "
            f"unexpected tensors {result.unexpected_keys[:5]}"
        )
    for alias, source in manifest["aliases"].items():
        _retie(model, alias, source)
    left = [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.is_meta
    ]
    if left:
        raise ValueError(
            f"tensors {left[:5]} are still on the meta device after loading {str(directory)!r}: "
            "they are not saved (non-persistent buffers?); build the skeleton with "
            "accelerate.init_empty_weights(include_buffers=False)"
        )
    return model


def _check_fit(model, new_layers, state, tensors_path, also_at) -> None:
    """Raise ValueError naming the tensors of ``state`` that do not fit the model to be.

    Shapes are checked for every tensor; dtypes for the quantized layers' tensors, whose bits
    mean nothing in another dtype.
    """
    paths = {path: name for name in new_layers for path in [name, *also_at.get(name, [])]}
    expected: dict[str, tuple[int, ...]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key.rpartition(".")[0] not in paths:
            expected[key] = tuple(tensor.shape)
    wrong_dtype = []
    for path, name in paths.items():
        for key, tensor in new_layers[name].state_dict(keep_vars=True).items():
            full = f"{path}.{key}"
            expected[full] = tuple(tensor.shape)
            if key != "bias" and full in state and state[full].dtype != tensor.dtype:
                wrong_dtype.append(f"{full} is {state[full].dtype}, expected {tensor.dtype}")
    if wrong_dtype:
        raise ValueError(f"{str(tensors_path)!r} does not fit the model: {wrong_dtype[:5]}")
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{key} {list(state[key].shape)} vs model {list(expected[key])}"
        for key in sorted(expected.keys() & state.keys())
        if tuple(state[key].shape) != expected[key]
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{str(tensors_path)!r} does not fit the model: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}, shape mismatches {mismatched[:5]}"
        )


def _retie(model: nn.Module, alias: str, source: str) -> None:
    """Make ``alias`` the same Parameter (or buffer) object as ``source``, as when saved.

    ``load_state_dict(assign=True)`` gives each name its own Parameter wrapping the shared
    tensor; a later ``.to()`` / ``.half()`` would then untie them.
    """
    a_path, _, a_name = alias.rpartition(".")
    s_path, _, s_name = source.rpartition(".")
    try:
        a_owner, s_owner = model.get_submodule(a_path), model.get_submodule(s_path)
    except AttributeError:
        return
    if a_name in a_owner._parameters and s_owner._parameters.get(s_name) is not None:
        a_owner._parameters[a_name] = s_owner._parameters[s_name]
    elif a_name in a_owner._buffers and s_owner._buffers.get(s_name) is not None:
        a_owner._buffers[a_name] = s_owner._buffers[s_name]


def _dedup_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that share memory (tied weights) are stored once; the others become aliases."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        key = (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        stored = tensor.detach().contiguous().cpu()
        if tensor.numel() and ptr in storages and stored.untyped_storage().data_ptr() == ptr:
            # A different view of a storage already kept (a slice, say): safetensors refuses
            # tensors that share memory, so this one is written as a copy.
            stored = stored.clone()
        storages.add(ptr)
        kept[name] = stored
    return kept, aliases


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing ancestors; return those created, deepest first."""
    created = []
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    for path in reversed(created):
        path.mkdir(exist_ok=True)
    return created


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``, replacing an existing ``target`` only after the move is ready."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
