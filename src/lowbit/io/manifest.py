"""Reading ``lowbit.json`` strictly: every entry `lowbit.load` uses is checked and typed.

A manifest may have been edited by hand, truncated, or written by another tool. Whatever is
wrong with it is reported as a `ManifestError` (a ``ValueError``) that names the file and the
field (``layers['model.layers.0.mlp.up_proj'].dtype``, say), before any model is touched.

What is checked:

* the file is UTF-8, strict JSON: no ``NaN``/``Infinity``, no number too large for a float, no
  key given twice in one object, not nested deeper than the parser can follow;
* ``format`` is ``"lowbit"`` and ``format_version`` is the integer this lowbit reads;
* ``tensors_file`` is a plain file name inside the checkpoint folder (no separator, no ``..``,
  no absolute path, no drive, not a symlink that leads out of the folder);
* ``sha256`` is 64 lower-case hexadecimal digits, as lowbit writes it (checked even when
  ``load(verify=False)`` skips the hash);
* ``layers`` maps layer names to objects holding exactly ``spec``, ``in_features``,
  ``out_features``, ``bias`` and ``dtype``, and optionally ``also_at`` (other names of a shared
  layer). Unknown per-layer keys are refused: a key this lowbit does not know could change how
  the layer's tensors are to be read, and ignoring it would load a different model;
* each ``spec`` holds the fields every lowbit release has written (``REQUIRED_SPEC_KEYS``);
  fields added later (``zero_point``, ``rotation``, ...) may be absent and then take the value
  that reproduces how checkpoints were read before they existed. `QuantSpec.from_dict` and
  the spec's grid then check the values;
* ``aliases`` maps tensor names to tensor names; ``metadata``, when present, is an object.

Unknown top-level keys are tolerated: new top-level information (such as ``files``) has been
added without a version change, and none of it changes how tensors are read.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from lowbit.dtypes import FLOAT_DTYPES
from lowbit.grids import get_grid
from lowbit.spec import QuantSpec

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 1

LAYER_KEYS = ("spec", "in_features", "out_features", "bias", "dtype")
OPTIONAL_LAYER_KEYS = ("also_at",)
# The spec fields of the first lowbit release; the later ones default to the old behaviour.
REQUIRED_SPEC_KEYS = (
    "bits",
    "group_size",
    "granularity",
    "symmetric",
    "grid",
    "fit",
    "scale_dtype",
    "version",
)

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A ``lowbit.json`` that cannot be read as a checkpoint's manifest."""


@dataclass(frozen=True)
class LayerEntry:
    """One quantized layer as the manifest describes it (values checked and typed)."""

    spec: QuantSpec
    in_features: int
    out_features: int
    bias: bool
    dtype: torch.dtype
    also_at: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """A checked ``lowbit.json``: the typed values `load` uses and the parsed JSON itself.

    Attributes:
        path: the manifest file.
        tensors_file: the tensors file's name, inside ``path``'s folder.
        sha256: the tensors file's expected hash, lower-case hex.
        layers: layer name -> `LayerEntry`, in the manifest's order.
        aliases: name of a tied tensor not stored -> name of the stored tensor it shares.
        metadata: the caller's information (``{}`` when the manifest has none).
        data: the parsed JSON, unchanged.
    """

    path: Path
    tensors_file: str
    sha256: str
    layers: dict[str, LayerEntry]
    aliases: dict[str, str]
    metadata: dict
    data: dict

    @property
    def tensors_path(self) -> Path:
        """Where the tensors file is (it may be missing)."""
        return self.path.parent / self.tensors_file


def read_manifest_file(path: str | os.PathLike) -> Manifest:
    """Read, parse and check the manifest at ``path`` (a ``lowbit.json``).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ManifestError: anything wrong with its content (the message names file and field), or
            a ``tensors_file`` that leads out of the manifest's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no lowbit manifest at {str(path)!r}")
    manifest = validate_manifest(parse_strict_json(path.read_bytes(), path), path)
    _check_confined(path.parent, manifest.tensors_file, path)
    return manifest


def parse_strict_json(raw: bytes | str, source: str | os.PathLike) -> object:
    """Parse ``raw`` as strict JSON, or raise `ManifestError` naming ``source``.

    Refused, beyond what ``json.loads`` refuses: ``NaN`` and ``Infinity`` literals, numbers that
    overflow a float (``1e400``), a key repeated in one object (readers disagree on which one
    wins), and nesting too deep to parse (``RecursionError``). The first two are reported with
    the path of the value, e.g. ``metadata['x'][2]``.
    """
    where = repr(str(source))
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = json.loads(
            text,
            parse_constant=_NonFinite,
            parse_float=_parse_float,
            object_pairs_hook=_object,
        )
    except RecursionError:
        depth, line, column = _deepest_point(text)
        raise ManifestError(
            f"{where} is not valid JSON for lowbit: nested {depth} levels deep "
            f"(line {line} column {column}), deeper than the parser can follow"
        ) from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ManifestError(f"{where} is not valid JSON: {err}") from None
    problem = _find_non_strict(data)
    if problem is not None:
        field, what = problem
        raise ManifestError(f"{where} is not strict JSON: {field} is {what}")
    return data


def validate_manifest(data: object, source: str | os.PathLike) -> Manifest:
    """Check parsed manifest ``data`` and return its typed values.

    ``source`` is the file it came from (named in errors, and the folder the tensors file is
    relative to). The file system is not consulted: `read_manifest_file` also checks where
    ``tensors_file`` leads.

    Raises:
        ManifestError: the first problem found, naming ``source`` and the field.
    """
    where = repr(str(source))

    def error(message: str) -> ManifestError:
        return ManifestError(f"{where}: {message}")

    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{where} is not a lowbit manifest")
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        # ``1.0`` and ``true`` equal 1 in Python but are not what lowbit writes.
        raise ManifestError(
            f"{where} has format_version {version!r}; this lowbit reads {FORMAT_VERSION}"
        )
    for key in ("tensors_file", "sha256", "layers", "aliases"):
        if key not in data:
            raise ManifestError(f"{where} lacks the {key!r} entry")

    tensors_file = data["tensors_file"]
    if not isinstance(tensors_file, str):
        raise error(f"tensors_file must be a file name, got {_kind(tensors_file)}")
    if not _is_plain_name(tensors_file):
        raise error(
            f"tensors_file must be a plain file name inside the checkpoint folder, "
            f"got {tensors_file!r}"
        )
    sha256 = data["sha256"]
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        shown = repr(sha256) if isinstance(sha256, str) else _kind(sha256)
        raise error(f"sha256 must be 64 lower-case hexadecimal digits, got {shown}")

    aliases = data["aliases"]
    if not isinstance(aliases, dict):
        raise error(f"aliases must be an object (tensor name -> tensor name), got {_kind(aliases)}")
    for alias, target in aliases.items():
        if not alias:
            raise error("aliases has an empty tensor name")
        if not isinstance(target, str) or not target:
            raise error(f"aliases[{alias!r}] must name a stored tensor, got {_show(target)}")

    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise error(f"metadata must be an object, got {_kind(metadata)}")

    raw_layers = data["layers"]
    if not isinstance(raw_layers, dict):
        raise error(f"layers must be an object (layer name -> layer), got {_kind(raw_layers)}")
    layers = {name: _layer(name, info, error) for name, info in raw_layers.items()}
    _check_shared_names(layers, error)

    return Manifest(
        path=Path(source),
        tensors_file=tensors_file,
        sha256=sha256,
        layers=layers,
        aliases=dict(aliases),
        metadata=metadata,
        data=data,
    )


def _layer(name: str, info: object, error: Callable[[str], ManifestError]) -> LayerEntry:
    field = f"layers[{name!r}]"
    if not name:
        raise error(f"{field}: a layer name must not be empty")
    if not isinstance(info, dict):
        raise error(f"{field} must be an object, got {_kind(info)}")
    unknown = sorted(set(info) - set(LAYER_KEYS) - set(OPTIONAL_LAYER_KEYS))
    if unknown:
        raise error(
            f"{field} has unknown entries {unknown}; this lowbit reads only "
            f"{[*LAYER_KEYS, *OPTIONAL_LAYER_KEYS]}"
        )
    for key in LAYER_KEYS:
        if key not in info:
            raise error(f"{field} lacks the {key!r} entry")

    sizes = {}
    for key in ("in_features", "out_features"):
        value = info[key]
        # Zero is allowed: save writes zero-width layers, and QuantLinear builds them.
        if type(value) is not int or value < 0:
            raise error(f"{field}.{key} must be a non-negative integer, got {_show(value)}")
        sizes[key] = value
    bias = info["bias"]
    if not isinstance(bias, bool):
        raise error(f"{field}.bias must be true or false, got {_show(bias)}")
    dtype = info["dtype"]
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise error(f"{field}.dtype must be one of {sorted(FLOAT_DTYPES)}, got {_show(dtype)}")

    also_at = info.get("also_at", [])
    if not isinstance(also_at, list):
        raise error(f"{field}.also_at must be an array of layer names, got {_kind(also_at)}")
    for i, path in enumerate(also_at):
        if not isinstance(path, str) or not path:
            raise error(f"{field}.also_at[{i}] must be a layer name, got {_show(path)}")

    return LayerEntry(
        spec=_spec(info["spec"], f"{field}.spec", error),
        in_features=sizes["in_features"],
        out_features=sizes["out_features"],
        bias=bias,
        dtype=FLOAT_DTYPES[dtype],
        also_at=tuple(also_at),
    )


def _spec(raw: object, field: str, error: Callable[[str], ManifestError]) -> QuantSpec:
    if not isinstance(raw, dict):
        raise error(f"{field} must be an object, got {_kind(raw)}")
    for key in REQUIRED_SPEC_KEYS:
        if key not in raw:
            raise error(f"{field} lacks the {key!r} entry")
    try:
        spec = QuantSpec.from_dict(raw)
        # A spec the grid cannot serve would only fail when the layer is built.
        get_grid(spec.grid).check_spec(spec)
    except (TypeError, ValueError) as err:
        raise error(f"{field} is not a valid spec: {err}") from None
    return spec


def _check_shared_names(
    layers: dict[str, LayerEntry], error: Callable[[str], ManifestError]
) -> None:
    """Each module path is one layer's: ``also_at`` names neither a layer nor another's path."""
    owner: dict[str, str] = {}
    for name, entry in layers.items():
        for path in entry.also_at:
            if path in layers:
                raise error(f"layers[{name!r}].also_at names {path!r}, which is a layer of its own")
            if path in owner:
                raise error(
                    f"layers[{name!r}].also_at names {path!r}, "
                    f"already a name of layer {owner[path]!r}"
                )
            owner[path] = name


def _check_confined(directory: Path, name: str, source: Path) -> None:
    """Refuse a tensors file that is a symlink leading out of ``directory``."""
    candidate = directory / name
    if not candidate.is_symlink():
        return
    base = directory.resolve()
    target = candidate.resolve()
    if not target.is_relative_to(base):
        raise ManifestError(
            f"{str(source)!r}: tensors_file {name!r} is a symlink to {str(target)!r}, "
            "outside the checkpoint folder"
        )


def _is_plain_name(name: str) -> bool:
    """A single path component on every platform: no separator, drive, ``.``/``..`` or NUL."""
    if name in ("", ".", "..") or "\0" in name:
        return False
    return PurePosixPath(name).name == name and PureWindowsPath(name).name == name


class _NonFinite:
    """Stands for a ``NaN``/``Infinity`` literal or an overflowing number until it is found
    (with its path) after parsing; the parser's hooks do not know where they are."""

    def __init__(self, text: str) -> None:
        self.text = text


class _DuplicateKeys(dict):
    """An object in which a key occurred more than once (``repeated`` lists them)."""

    repeated: list[str]


def _parse_float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _object(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        dup = _DuplicateKeys(result)
        seen: set[str] = set()
        dup.repeated = []
        for key, _ in pairs:
            if key in seen:
                dup.repeated.append(key)
            seen.add(key)
        return dup
    return result


def _find_non_strict(data: object) -> tuple[str, str] | None:
    """The path and description of the first non-finite number or repeated key, if any.

    Iterative: the parser accepts nesting close to the recursion limit, which a recursive walk
    would then exceed.
    """
    stack: list[tuple[str, object]] = [("", data)]
    while stack:
        path, value = stack.pop()
        shown = path or "the top level"
        if isinstance(value, _NonFinite):
            return shown, f"{value.text}, which strict JSON does not allow"
        if isinstance(value, _DuplicateKeys):
            return shown, f"an object with the key {value.repeated[0]!r} given twice"
        if isinstance(value, dict):
            items = [(f"{path}[{k!r}]" if path else k, v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        stack.extend(reversed(items))
    return None


def _deepest_point(text: str) -> tuple[int, int, int]:
    """Nesting depth of ``text``'s deepest array or object, and where (line, column) it opens.

    Brackets inside strings do not count. Only called once the parser has given up, to say
    where; the text is then known to be nested too deeply, not necessarily otherwise valid.
    """
    depth = deepest = at = 0
    in_string = escaped = False
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, at = depth, i
        elif char in "]}":
            depth -= 1
    line = text.count("\n", 0, at) + 1
    return deepest, line, at - text.rfind("\n", 0, at)


def _kind(value: object) -> str:
    """The JSON type of ``value``, as a manifest's reader thinks of it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _show(value: object) -> str:
    """``value`` in an error message: scalars as they are, containers by their type."""
    if isinstance(value, (list, dict)):
        return _kind(value)
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
