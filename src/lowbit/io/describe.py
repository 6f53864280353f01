"""What a saved directory holds, read without building a model (``lowbit inspect``).

`describe_checkpoint` verifies the checkpoint (`lowbit.io.checkpoint.verify`: manifest, tensors
file, sha256, safetensors header), then reads each quantized layer's own tensors with
``safetensors.safe_open`` (one layer at a time; nothing is unpickled) into a `QuantizedTensor`
to report its stored size and the paths `QuantLinear` takes on CPU by batch size (its dispatch
plan for inputs in the weight's dtype).
Every other tensor is counted from the file's header alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lowbit.dtypes import FLOAT_DTYPES
from lowbit.io.checkpoint import MANIFEST, verify
from lowbit.io.manifest import LayerEntry, validate_manifest
from lowbit.kernels.dispatch import plan_for
from lowbit.spec import QuantSpec
from lowbit.tensor import BlockLayout, QuantizedTensor

KERNEL_DEVICE = "cpu"

# Bytes per element of safetensors' dtype names (the header gives the name, not the size).
_ELEMENT_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


def describe_checkpoint(directory: str | os.PathLike) -> dict:
    """A JSON-able description of the checkpoint in ``directory``.

    Returns:
        ``{"directory", "tensors_file", "format_version", "source_model", "specs",
        "exclude", "layers", "totals"}``: ``source_model`` / ``specs`` (labels) / ``exclude``
        from the manifest's metadata (``None`` when it does not hold them); ``layers`` a list
        of ``{"name", "also_at", "shape", "spec", "label", "bits_per_weight", "bytes",
        "kernel"}`` in the manifest's order (``kernel``: `Plan.summary` of the paths
        `QuantLinear` takes on CPU by batch size, e.g. ``"cpu_native:1-16,dequantize:17+"``);
        ``totals`` the layers'
        weights, bytes and bits per weight, and the other tensors' count and bytes.

    Raises:
        FileNotFoundError: ``directory``, its manifest or its tensors file is missing.
        ValueError: a malformed manifest, a corrupted or truncated tensors file, or a layer
            whose tensors do not match its spec (the message names the layer and tensor).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(directory)!r} is not a directory")
    try:
        data = verify(directory)
    except FileNotFoundError:
        if (directory / MANIFEST).is_file():
            raise  # the tensors file is missing: verify's message names it
        raise FileNotFoundError(
            f"{str(directory)!r} is not a lowbit checkpoint: it has no {MANIFEST} (write one "
            "with 'lowbit quantize --out' or lowbit.save)"
        ) from None
    manifest = validate_manifest(data, directory / MANIFEST)
    tensors_path = manifest.tensors_path
    layers, used = [], set()
    try:
        with safe_open(str(tensors_path), "pt") as handle:
            stored = set(handle.keys())
            for name, entry in manifest.layers.items():
                qt, keys = _read_layer(handle, stored, manifest.aliases, name, entry)
                used |= keys
                layers.append(_layer_row(name, entry, qt))
            others = sorted(stored - used)
            other_bytes = sum(_stored_bytes(handle, key) for key in others)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {str(tensors_path)!r}: {err}") from None
    weights = sum(row["shape"][0] * row["shape"][1] for row in layers)
    layer_bytes = sum(row["bytes"] for row in layers)
    meta = manifest.metadata  # the caller's: any JSON object, read as far as it is ours
    source = meta.get("source_model")
    return {
        "directory": str(directory),
        "tensors_file": manifest.tensors_file,
        "format_version": data.get("format_version"),
        "source_model": source if isinstance(source, str) else None,
        "specs": _spec_labels(meta.get("specs")),
        "exclude": _strings(meta.get("exclude")),
        "layers": layers,
        "totals": {
            "layers": len(layers),
            "weights": weights,
            "bytes": layer_bytes,
            "bits_per_weight": 8.0 * layer_bytes / weights if weights else 0.0,
            "other_tensors": len(others),
            "other_bytes": other_bytes,
            "file_bytes": tensors_path.stat().st_size,
        },
    }


def _read_layer(handle, stored: set, aliases: dict, name: str, entry: LayerEntry):
    """The layer's `QuantizedTensor` (its tensors only) and the stored keys it used."""
    spec = entry.spec
    shape = (entry.out_features, entry.in_features)
    scale_dtype = FLOAT_DTYPES[spec.scale_dtype]
    dtypes = {"packed": torch.uint8, "scale": scale_dtype, "signs": torch.uint8}
    dtypes["zero"] = scale_dtype if spec.zero_point == "float" else torch.uint8
    tensors, keys = {}, set()
    for part, expected in BlockLayout.of(shape, spec).expected_shapes(spec).items():
        key = aliases.get(f"{name}.{part}", f"{name}.{part}")
        if key not in stored:
            raise ValueError(f"layer {name!r} ({spec.label}): tensor {key!r} is missing")
        tensor = handle.get_tensor(key)
        if tuple(tensor.shape) != expected or tensor.dtype != dtypes[part]:
            raise ValueError(
                f"layer {name!r} ({spec.label}): tensor {key!r} is {tensor.dtype} "
                f"{list(tensor.shape)}, its spec needs {dtypes[part]} {list(expected)}"
            )
        tensors[part] = tensor
        keys.add(key)
    qt = QuantizedTensor(
        tensors["packed"],
        tensors["scale"],
        tensors.get("zero"),
        spec,
        torch.Size(shape),
        entry.dtype,
        tensors.get("signs"),
    )
    return qt, keys


def _layer_row(name: str, entry: LayerEntry, qt: QuantizedTensor) -> dict:
    # The paths a forward in the weight's own dtype takes on CPU, by batch size.
    kernel = plan_for(qt, torch.device(KERNEL_DEVICE), entry.dtype).summary()
    return {
        "name": name,
        "also_at": list(entry.also_at),
        "shape": [entry.out_features, entry.in_features],
        "spec": entry.spec.to_dict(),
        "label": entry.spec.label,
        "bits_per_weight": qt.bits_per_weight,
        "bytes": qt.nbytes,
        "kernel": kernel,
    }


def _stored_bytes(handle, key: str) -> int:
    """Bytes of tensor ``key``, from the header (read only for a dtype this table lacks)."""
    part = handle.get_slice(key)
    size = _ELEMENT_BYTES.get(part.get_dtype())
    if size is None:
        tensor = handle.get_tensor(key)
        return tensor.numel() * tensor.element_size()
    count = 1
    for dim in part.get_shape():
        count *= dim
    return count * size


def _spec_labels(raw) -> list[str] | None:
    """Labels of the metadata's ``specs`` (what the CLI asked for), ``None`` if unreadable."""
    if not isinstance(raw, list):
        return None
    try:
        return [QuantSpec.from_dict(item).label for item in raw]
    except (TypeError, ValueError):
        return None


def _strings(raw) -> list[str] | None:
    ok = isinstance(raw, list) and all(isinstance(item, str) for item in raw)
    return raw if ok else None


def format_description(data: dict) -> str:
    """`describe_checkpoint`'s result as the text ``lowbit inspect`` prints."""
    totals = data["totals"]
    specs = ", ".join(data["specs"]) if data["specs"] else "-"
    lines = [
        f"checkpoint: {data['directory']} ({data['tensors_file']}, sha256 verified)",
        f"source model: {data['source_model'] or '-'}",
        f"specs: {specs}; kept float: {data['exclude'] if data['exclude'] is not None else '-'}",
    ]
    rows = data["layers"]
    name_width = max([len("layer"), *(len(r["name"]) for r in rows)])
    label_width = max([len("spec"), *(len(r["label"]) for r in rows)])
    head = (
        f"{'layer':<{name_width}}  {'shape':>11}  {'spec':<{label_width}}  {'bits/w':>6}  "
        f"{'bytes':>10}  paths on cpu (by tokens)"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        lines.append(
            f"{r['name']:<{name_width}}  {shape:>11}  {r['label']:<{label_width}}  "
            f"{r['bits_per_weight']:>6.3f}  {r['bytes']:>10}  {r['kernel']}"
        )
        if r["also_at"]:
            lines.append(f"  (also at {', '.join(r['also_at'])})")
    lines.append(
        f"total: {totals['layers']} quantized layers, {totals['weights']} weights, "
        f"{totals['bytes']} bytes, {totals['bits_per_weight']:.3f} bits/weight; "
        f"{totals['other_tensors']} other tensors, {totals['other_bytes']} bytes; "
        f"{data['tensors_file']} {totals['file_bytes']} bytes"
    )
    return "\n".join(lines)
