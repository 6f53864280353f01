"""`save` / `load`: a quantized model as ``model.safetensors`` + ``lowbit.json``.

Layout of a saved directory::

    lowbit.json         format, version, per-layer specs, tied-tensor aliases, sha256 of the
                        tensors, and the list of files lowbit wrote
    model.safetensors   every tensor of the state dict (quantized buffers and float parameters)
    ...                 extra files the caller adds (a Hugging Face config and tokenizer, say),
                        and any files of the user's own, which saving never touches

Writes are staged inside the directory and moved into place with the manifest last
(`lowbit.io.staging`), so a failed or killed save never leaves a mix or an empty name.
Loading reads JSON and safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.dtypes import DTYPE_NAMES
from lowbit.io.manifest import FORMAT_NAME, FORMAT_VERSION, Manifest, read_manifest_file
from lowbit.io.outputs import write_text_atomic
from lowbit.io.staging import (
    OBSOLETE,
    STAGE_PREFIX,
    commit,
    new_stage,
    only_stages,
    recover,
    staged_files,
)
from lowbit.modules import linear_weight, other_names, replace_modules
from lowbit.nn import QuantLinear
from lowbit.spec import QuantSpec

MANIFEST = "lowbit.json"
# Key of the layer entries in the tensors file's safetensors header.
LAYERS_KEY = "lowbit.layers"
TENSORS = "model.safetensors"


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    metadata: dict | None = None,
    write_extra: Callable[[Path], None] | None = None,
    overwrite: bool = True,
) -> Path:
    """Save ``model`` (quantized or not) to ``directory``, crash-safely.

    Files go into a hidden stage folder inside ``directory`` and are moved into place with the
    manifest last (see `lowbit.io.staging`): a failed or killed save leaves the previous
    checkpoint, or the new one once the next save or load has finished the move; never a mix,
    never an empty name. Files in ``directory`` that lowbit did not write (notes, reports,
    evaluation results) are kept; a previous save's files that this one does not write again
    are removed. A symlink to a directory stays a symlink: the checkpoint goes where it points.

    Args:
        model: a model whose `QuantLinear` layers (and everything else in its state dict) are saved.
        directory: created if missing (with its parents). If it exists it must be empty or a
            lowbit checkpoint (it holds ``lowbit.json``): anything else (a source model, say) is
            an error, raised before anything is written.
        metadata: JSON-able information stored under ``"metadata"`` in the manifest (strict
            JSON: NaN and infinities are refused).
        write_extra: called with the stage folder to add files (configs, tokenizers); they
            become part of the checkpoint (listed in the manifest as lowbit's own).
        overwrite: replace an existing lowbit checkpoint (default); ``False`` refuses.

    Returns:
        The directory's path (as given).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: metadata is not strict JSON, a tensor is on the meta device, or
            ``directory`` is a file or a dangling symlink.
        FileExistsError: ``directory`` is not a lowbit checkpoint (or ``overwrite=False``), or
            an extra file would replace a file lowbit did not write.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    metadata_json = _strict_json(metadata or {}, "metadata")
    target = Path(directory)
    real = check_save_target(target, overwrite=overwrite)
    meta = [name for name, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise ValueError(
            f"cannot save: tensors {meta[:5]} are on the meta device (no data); "
            "load or quantize real weights first"
        )
    state, aliases = _dedup_state(model.state_dict())
    layers = _layer_entries(model)
    created = _make_parents(real)
    stage = None
    try:
        previous, deletable = _owned_files(real)
        stage = new_stage(real)
        tensors_path = stage / TENSORS
        # The layer entries go into the tensors file's header too, which the manifest's sha256
        # covers: an edited spec (a group size giving the same number of groups) is caught.
        header = {"format": FORMAT_NAME, LAYERS_KEY: _canonical(layers)}
        save_file(state, str(tensors_path), metadata=header)
        if write_extra is not None:
            write_extra(stage)
        files = staged_files(stage, MANIFEST)
        if previous is not None:
            clobbered = [f for f in files if (real / f).exists() and f not in previous]
            if clobbered:
                raise FileExistsError(
                    f"{str(target)!r}: saving would replace {clobbered[:5]}, which lowbit did "
                    "not write; move them away or save elsewhere"
                )
            obsolete = sorted(set(deletable) - set(files) - {MANIFEST})
            (stage / OBSOLETE).write_text(json.dumps(obsolete))
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tensors_file": TENSORS,
            "sha256": _sha256(tensors_path),
            "layers": layers,
            "aliases": aliases,
            "files": files,
            "metadata": json.loads(metadata_json),
        }
        # The stage's manifest is written last: its presence marks the stage complete.
        write_text_atomic(stage / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False))
        commit(stage, real, MANIFEST)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return target


def check_save_target(directory: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Check that `save` may write to ``directory``, before any long work; return the real
    folder it will write (a symlink resolved). Also finishes or cleans up what an earlier
    killed save left there.

    Raises:
        ValueError: ``directory`` (or a folder above it) is a file, or a dangling symlink.
        FileExistsError: it exists and is neither empty nor a lowbit checkpoint, or it is a
            checkpoint and ``overwrite`` is false.
        PermissionError: it (or the nearest folder above it that exists) is not writable.
    """
    target = Path(directory)
    if target.is_symlink() and not target.exists():
        raise ValueError(f"{str(target)!r} is a symlink to nothing ({os.readlink(target)!r})")
    real = target.resolve() if target.is_symlink() else target
    recover(real, MANIFEST)
    if real.exists() and not real.is_dir():
        raise ValueError(f"directory {str(target)!r} exists and is not a directory")
    if real.is_dir():
        if (real / MANIFEST).is_file():
            if not overwrite:
                raise FileExistsError(f"{str(target)!r} exists; pass overwrite=True to replace it")
        elif not only_stages(real):
            raise FileExistsError(
                f"{str(target)!r} exists and is not a lowbit checkpoint; refusing to write into it"
            )
    existing = real
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write to {str(target)!r}: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {str(target)!r}: {str(existing)!r} is not writable")
    return real


def _layer_entries(model: nn.Module) -> dict[str, dict]:
    """The manifest's ``layers``: spec, shape, bias and dtype of every `QuantLinear`, each
    stored once, with the other names a shared layer is registered under (``also_at``)."""
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
    for name, others in other_names(model).items():
        if name in layers:
            layers[name]["also_at"] = others
    return layers


def _owned_files(directory: Path) -> tuple[list[str] | None, list[str]]:
    """(files a save may overwrite, files it may delete) in the checkpoint in ``directory``:
    those lowbit wrote. ``(None, [])`` where there is no checkpoint.

    Checkpoints of lowbit 0.1 list no files; their directory was always replaced whole, so
    every file they hold may be overwritten, but none is deleted (the user may have added it).
    """
    path = directory / MANIFEST
    if not path.is_file():
        return None, []
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError, RecursionError):
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return [MANIFEST, *files], files
    legacy = [p.relative_to(directory).as_posix() for p in _legacy_files(directory)]
    return [MANIFEST, *legacy], []


def _legacy_files(directory: Path):
    for path in directory.rglob("*"):
        if path.is_file() and not any(p.startswith(STAGE_PREFIX) for p in path.parts):
            yield path


def _strict_json(value, what: str) -> str:
    """``value`` as strict JSON text, or a ValueError naming ``what``."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{what} must be strict JSON (no NaN or infinity): {err}") from None
    except (TypeError, RecursionError) as err:
        raise ValueError(f"{what} is not JSON-serialisable: {err}") from None


def read_manifest(directory: str | os.PathLike) -> dict:
    """The parsed ``lowbit.json`` of a saved directory, with every entry `load` uses checked
    (see `lowbit.io.manifest`: types, the tensors file confined to the directory, specs).

    A save that was killed while moving its files into ``directory`` is finished first (see
    `lowbit.io.staging.recover`), so the manifest read is always a whole checkpoint's.

    Raises:
        FileNotFoundError: no ``lowbit.json`` in ``directory``.
        ValueError: a malformed manifest; the message names the file and the field.
    """
    return _checked_manifest(directory).data


def _checked_manifest(directory: str | os.PathLike) -> Manifest:
    """`read_manifest`, returning the checked, typed values (`lowbit.io.manifest.Manifest`)."""
    directory = Path(directory)
    with contextlib.suppress(OSError):
        recover(directory.resolve() if directory.is_symlink() else directory, MANIFEST)
    return read_manifest_file(directory / MANIFEST)


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
        ValueError: a malformed manifest (the message names the file and the field), a
            corrupted/truncated file, or a layer or tensor that does not match ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    directory = Path(directory)
    manifest = _checked_manifest(directory)
    tensors_path = directory / manifest.tensors_file
    if not tensors_path.is_file():
        raise FileNotFoundError(f"tensors file {str(tensors_path)!r} is missing")
    if verify and _sha256(tensors_path) != manifest.sha256:
        raise ValueError(
            f"{str(tensors_path)!r} is corrupted: its sha256 does not match the manifest"
        )
    try:
        state = load_file(str(tensors_path))
        _check_layers_match(tensors_path, manifest.path, manifest.data["layers"])
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {str(tensors_path)!r}: {err}") from None
    for alias, source in manifest.aliases.items():
        if alias in state:
            # Loading would replace the stored tensor by another one of the same shape.
            raise ValueError(
                f"{str(manifest.path)!r}: aliases[{alias!r}] names a tensor the tensors file "
                "stores (an alias names a tied tensor that is not stored)"
            )
        if source not in state:
            raise ValueError(
                f"{str(tensors_path)!r}: alias {alias!r} points to missing tensor {source!r}"
            )
        state[alias] = state[source]

    new_layers: dict[str, QuantLinear] = {}
    for name, entry in manifest.layers.items():
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
        if shape != (entry.out_features, entry.in_features):
            raise ValueError(
                f"layer {name!r}: saved shape [{entry.out_features}, {entry.in_features}] "
                f"does not match the model's {list(shape)}"
            )
        new_layers[name] = QuantLinear(
            entry.in_features,
            entry.out_features,
            entry.bias,
            entry.spec,
            dtype=entry.dtype,
            device="meta",
        )
    # Check every tensor against the model as it will be before touching it, so a file that
    # does not fit leaves the skeleton unchanged.
    also_at = {name: list(entry.also_at) for name, entry in manifest.layers.items()}
    _check_fit(model, new_layers, state, tensors_path, also_at)
    # Exactly the names the manifest lists: it records how the saved model shared its layers.
    replace_modules(
        model,
        {path: new_layers[name] for name, paths in also_at.items() for path in [name, *paths]},
        every_name=False,
    )
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
    for alias, source in manifest.aliases.items():
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


def verify(directory: str | os.PathLike) -> dict:
    """Check a saved directory without loading it into a model; return its manifest.

    Reads the manifest, checks that the tensors file is there, matches its sha256 and has a
    readable safetensors header: what `load` would find wrong with the files themselves, in
    the time it takes to read them once (a long evaluation checks every input first).

    Raises:
        FileNotFoundError: no manifest or no tensors file.
        ValueError: an invalid manifest, or a corrupted or truncated tensors file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    tensors_path = directory / str(manifest["tensors_file"])
    if not tensors_path.is_file():
        raise FileNotFoundError(f"tensors file {str(tensors_path)!r} is missing")
    if _sha256(tensors_path) != manifest["sha256"]:
        raise ValueError(
            f"{str(tensors_path)!r} is corrupted: its sha256 does not match the manifest"
        )
    try:
        with safe_open(str(tensors_path), "pt") as handle:
            handle.keys()
        _check_layers_match(tensors_path, directory / MANIFEST, manifest["layers"])
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {str(tensors_path)!r}: {err}") from None
    return manifest


def _canonical(layers: dict) -> str:
    """Layer entries (checked ones) as one canonical JSON string: every spec with all its
    fields (a manifest may omit the fields later releases added), ``also_at`` always present,
    sorted keys, no spaces."""
    normal = {
        name: {
            **entry,
            "spec": QuantSpec.from_dict(entry["spec"]).to_dict(),
            "also_at": list(entry.get("also_at", [])),
        }
        for name, entry in layers.items()
    }
    return json.dumps(normal, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _check_layers_match(tensors_path: Path, manifest_path: Path, layers: dict) -> None:
    """Raise ``ValueError`` if the tensors file's header records layer entries other than the
    manifest's (files saved before the header held them are not checked)."""
    with safe_open(str(tensors_path), "pt") as handle:
        recorded = (handle.metadata() or {}).get(LAYERS_KEY)
    current = _canonical(layers)
    if recorded is None or recorded == current:
        return
    layers = json.loads(current)
    try:
        saved = json.loads(recorded)
    except json.JSONDecodeError:
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    names = sorted(set(saved) | set(layers))
    differing = [name for name in names if saved.get(name) != layers.get(name)]
    detail = ""
    if differing:
        name = differing[0]
        old, new = saved.get(name), layers.get(name)
        old, new = (x if isinstance(x, dict) else {} for x in (old, new))
        fields = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if (
            "spec" in fields
            and isinstance(old.get("spec"), dict)
            and isinstance(new.get("spec"), dict)
        ):
            spec_old, spec_new = old["spec"], new["spec"]
            fields = [
                f"spec.{k}"
                for k in sorted(set(spec_old) | set(spec_new))
                if spec_old.get(k) != spec_new.get(k)
            ]
        detail = f": layers[{name!r}] differs in {fields}"
    raise ValueError(
        f"{str(manifest_path)!r} does not describe {str(tensors_path)!r}{detail} (the manifest "
        "was edited after saving; save the model again)"
    )
