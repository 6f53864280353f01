"""A malformed or edited ``lowbit.json`` is a ValueError naming the file and the field, raised
before the model is touched; never a KeyError, TypeError, RecursionError, nor a file read from
outside the checkpoint folder."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit import QuantSpec, quantize_model
from lowbit.io import read_manifest
from lowbit.io.checkpoint import verify

UP = "model.layers.0.mlp.up_proj"
DOWN = "model.layers.0.mlp.down_proj"
SPECS = {
    f"*.{UP.rsplit('.', 1)[1]}": QuantSpec(bits=4, group_size=16),
    f"*.{DOWN.rsplit('.', 1)[1]}": QuantSpec(bits=8, symmetric=True),
    "shared": QuantSpec(bits=3, group_size=32, zero_point="float", rotation="hadamard"),
}
IDS = torch.arange(12).view(2, 6)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(32, 64, bias=False)
        self.down_proj = nn.Linear(64, 32)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block()])


class Tiny(nn.Module):
    """Nested layer names, a layer shared under two names, a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 32)
        self.model = Inner()
        self.shared = nn.Linear(32, 32)
        self.again = self.shared
        self.head = nn.Linear(32, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.model.layers:
            x = x + block.mlp.down_proj(torch.tanh(block.mlp.up_proj(x)))
        return self.head(self.again(torch.tanh(self.shared(x))))


def quantized_tiny() -> Tiny:
    model = Tiny().eval()
    report = quantize_model(model, dict(SPECS), exclude=["head"], progress=False)
    assert sorted(r.name for r in report.quantized) == sorted([UP, DOWN, "shared"])
    return model


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS)


@pytest.fixture
def model():
    return quantized_tiny()


@pytest.fixture
def saved(model, tmp_path):
    return lowbit.save(model, tmp_path / "ckpt", metadata={"note": "tiny"})


def write_with(directory: Path, change, literal: str) -> None:
    """Rewrite the manifest with ``change`` applied and its ``"@@"`` string replaced by
    ``literal`` (text json.dumps would not write)."""
    path = directory / "lowbit.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest).replace('"@@"', literal))


def edit(directory: Path, change) -> None:
    path = directory / "lowbit.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def snapshot(model: nn.Module):
    modules = [(name, id(m)) for name, m in model.named_modules(remove_duplicate=False)]
    tensors = {
        name: (id(t), t.detach().clone())
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    }
    return modules, tensors


def assert_unchanged(model: nn.Module, before) -> None:
    modules, tensors = snapshot(model)
    assert modules == before[0]
    assert tensors.keys() == before[1].keys()
    for name, (ident, value) in tensors.items():
        assert ident == before[1][name][0], name
        assert torch.equal(value, before[1][name][1]), name


def refused(directory: Path, match: str, *, verify: bool = True) -> ValueError:
    """Load into a fresh skeleton: a ValueError naming the manifest and ``match``; the
    skeleton as it was."""
    skeleton = Tiny()
    before = snapshot(skeleton)
    with pytest.raises(ValueError, match=match) as info:
        lowbit.load(directory, skeleton, verify=verify)
    assert str(directory / "lowbit.json") in str(info.value)
    assert_unchanged(skeleton, before)
    return info.value


def set_layer(name: str, key: str, value):
    def change(manifest):
        manifest["layers"][name][key] = value

    return change


def del_layer(name: str, key: str):
    def change(manifest):
        del manifest["layers"][name][key]

    return change


def set_top(key: str, value):
    def change(manifest):
        manifest[key] = value

    return change


def set_spec(name: str, key: str, value):
    def change(manifest):
        manifest["layers"][name]["spec"][key] = value

    return change


def del_spec(name: str, key: str):
    def change(manifest):
        del manifest["layers"][name]["spec"][key]

    return change


L_UP = r"layers\['model\.layers\.0\.mlp\.up_proj'\]"
L_DOWN = r"layers\['model\.layers\.0\.mlp\.down_proj'\]"


# (a) The reported cases, and their neighbours.

CASES = {
    "dtype float64": (set_layer(UP, "dtype", "float64"), rf"{L_UP}\.dtype must be one of"),
    "dtype missing": (del_layer(UP, "dtype"), rf"{L_UP} lacks the 'dtype' entry"),
    "dtype null": (set_layer(UP, "dtype", None), rf"{L_UP}\.dtype .* got null"),
    "spec missing": (del_layer(DOWN, "spec"), rf"{L_DOWN} lacks the 'spec' entry"),
    "spec a list": (set_layer(DOWN, "spec", [8]), rf"{L_DOWN}\.spec must be an object"),
    "layers null": (set_top("layers", None), r"layers must be an object.*got null"),
    "layers a list": (set_top("layers", [UP]), r"layers must be an object"),
    "layer null": (set_top("layers", {UP: None}), rf"{L_UP} must be an object, got null"),
    "tensors_file a number": (set_top("tensors_file", 5), r"tensors_file must be a file name"),
    "in_features a string": (
        set_layer(UP, "in_features", "32"),
        rf'{L_UP}\.in_features must be a non-negative integer, got "32"',
    ),
    "in_features true": (set_layer(UP, "in_features", True), rf"{L_UP}\.in_features"),
    "in_features 32.0": (set_layer(UP, "in_features", 32.0), rf"{L_UP}\.in_features"),
    "in_features -1": (set_layer(UP, "in_features", -1), rf"{L_UP}\.in_features"),
    "out_features missing": (del_layer(UP, "out_features"), rf"{L_UP} lacks the 'out_features'"),
    "bias a string": (set_layer(DOWN, "bias", "yes"), rf"{L_DOWN}\.bias must be true or false"),
    "bias 1": (set_layer(DOWN, "bias", 1), rf"{L_DOWN}\.bias must be true or false"),
    "unknown layer entry": (
        set_layer(UP, "scale", 1.5),
        rf"{L_UP} has unknown entries \['scale'\]",
    ),
    "aliases a list": (set_top("aliases", ["head.weight"]), r"aliases must be an object"),
    "alias to a number": (
        set_top("aliases", {"head.weight": 5}),
        r"aliases\['head\.weight'\] must name a stored tensor, got 5",
    ),
    "alias over a stored tensor": (
        set_top("aliases", {"head.weight": "emb.weight", f"{DOWN}.bias": "shared.bias"}),
        rf"aliases\['{re.escape(DOWN)}\.bias'\] names a tensor the tensors file stores",
    ),
    "also_at a string": (
        set_layer("shared", "also_at", "again"),
        r"layers\['shared'\]\.also_at must be an array",
    ),
    "also_at a number inside": (
        set_layer("shared", "also_at", [5]),
        r"layers\['shared'\]\.also_at\[0\] must be a layer name",
    ),
    "also_at names a layer": (
        set_layer("shared", "also_at", ["again", DOWN]),
        r"layers\['shared'\]\.also_at names 'model\.layers\.0\.mlp\.down_proj', which is a layer",
    ),
    "sha256 a number": (
        set_top("sha256", 5),
        r"sha256 must be 64 lower-case hexadecimal digits, got an integer",
    ),
    "sha256 not hex": (
        set_top("sha256", "z" * 64),
        r"sha256 must be 64 lower-case hexadecimal digits",
    ),
    "sha256 too short": (
        set_top("sha256", "0" * 63),
        r"sha256 must be 64 lower-case hexadecimal digits",
    ),
    "format_version true": (set_top("format_version", True), r"format_version True"),
    "format_version 1.0": (set_top("format_version", 1.0), r"format_version 1\.0"),
    "metadata a list": (set_top("metadata", [1]), r"metadata must be an object, got an array"),
    "metadata null": (set_top("metadata", None), r"metadata must be an object, got null"),
    "spec bits a string": (
        set_spec(UP, "bits", "4"),
        rf"{L_UP}\.spec is not a valid spec: QuantSpec\.bits must be an int",
    ),
    "spec bits 99": (set_spec(UP, "bits", 99), rf"{L_UP}\.spec is not a valid spec.*bits"),
    "spec unknown key": (set_spec(UP, "colour", "red"), rf"{L_UP}\.spec .*unknown keys"),
    "spec unknown grid": (set_spec(UP, "grid", "nope"), rf"{L_UP}\.spec .*unknown grid 'nope'"),
    "spec fit_options a list": (set_spec(UP, "fit_options", [["a", 1]]), rf"{L_UP}\.spec .*"),
    "spec lacks grid": (del_spec(UP, "grid"), rf"{L_UP}\.spec lacks the 'grid' entry"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_entry_is_a_value_error_naming_file_and_field(saved, case):
    change, match = CASES[case]
    edit(saved, change)
    refused(saved, match)


def test_reported_field_path_for_a_nested_layer_name(saved):
    edit(saved, set_layer(UP, "dtype", "float64"))
    err = refused(saved, "float64")
    assert "layers['model.layers.0.mlp.up_proj'].dtype" in str(err)
    with pytest.raises(ValueError, match=r"up_proj'\]\.dtype"):
        read_manifest(saved)


def test_malformed_sha256_is_refused_without_verify_too(saved):
    edit(saved, set_top("sha256", "not a hash"))
    refused(saved, "sha256 must be 64 lower-case hexadecimal digits", verify=False)


def test_upper_case_sha256_is_refused(saved):
    # lowbit writes lower case, and `lowbit.io.checkpoint.verify` compares the text as is.
    edit(saved, lambda m: m.update(sha256=m["sha256"].upper()))
    refused(saved, "sha256 must be 64 lower-case hexadecimal digits")


@pytest.mark.parametrize("depth", [5_000, 200_000])
def test_deeply_nested_json(saved, depth):
    write_with(saved, set_top("metadata", "@@"), "[" * depth + "]" * depth)
    err = refused(saved, r"not valid JSON for lowbit: nested \d+ levels deep \(line \d+ column")
    assert f"nested {depth + 1} levels" in str(err)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_non_finite_numbers_are_refused(saved, literal):
    write_with(saved, set_top("metadata", {"note": [1, {"x": "@@"}]}), literal)
    refused(saved, rf"not strict JSON: metadata\['note'\]\[1\]\['x'\] is {literal}")


def test_non_finite_number_in_a_layer(saved):
    write_with(saved, set_layer(UP, "in_features", "@@"), "NaN")
    refused(saved, r"layers\['model\.layers\.0\.mlp\.up_proj'\]\['in_features'\] is NaN")


def test_repeated_key_is_refused(saved):
    # The last one wins in Python; another reader may take the first.
    write_with(saved, set_layer(UP, "dtype", "@@"), '"float64", "dtype": "float32"')
    refused(saved, rf"{L_UP} is an object with the key 'dtype' given twice")


# tensors_file must stay inside the checkpoint folder.


@pytest.fixture
def other(tmp_path):
    """Another valid checkpoint of the same architecture, next to ``saved``."""
    model = quantized_tiny()
    lowbit.save(model, tmp_path / "other")
    return tmp_path / "other" / "model.safetensors"


def use_other_tensors(saved: Path, other: Path, name: str) -> None:
    """Point ``saved``'s manifest at ``name``, with the sha256 of ``other`` (so that only the
    confinement stands between the manifest and a successful load of foreign tensors)."""
    sha = json.loads((other.parent / "lowbit.json").read_text())["sha256"]
    edit(saved, lambda m: m.update(tensors_file=name, sha256=sha))


@pytest.mark.parametrize(
    "name",
    ["../other/model.safetensors", "ABSOLUTE", "sub/../../other/model.safetensors", "..", "."],
)
def test_tensors_file_outside_the_folder_is_refused(saved, other, name):
    name = str(other) if name == "ABSOLUTE" else name
    use_other_tensors(saved, other, name)
    refused(saved, r"tensors_file must be a plain file name inside the checkpoint folder")


@pytest.mark.parametrize("name", ["..\\other\\model.safetensors", "C:model.safetensors", "a\0b"])
def test_tensors_file_not_portable_or_not_a_name(saved, name):
    edit(saved, set_top("tensors_file", name))
    refused(saved, r"tensors_file must be a plain file name")


def test_tensors_file_symlink_out_of_the_folder_is_refused(saved, other):
    (saved / "elsewhere.safetensors").symlink_to(os.path.relpath(other, saved))
    use_other_tensors(saved, other, "elsewhere.safetensors")
    refused(saved, r"tensors_file 'elsewhere\.safetensors' is a symlink to .*outside")


def test_tensors_file_symlink_inside_the_folder_is_fine(model, saved):
    (saved / "model.safetensors").rename(saved / "real.safetensors")
    (saved / "model.safetensors").symlink_to("real.safetensors")
    assert torch.equal(outputs(lowbit.load(saved, Tiny())), outputs(model))


# What is tolerated.


def test_unknown_top_level_keys_and_absent_later_fields_are_fine(model, saved):
    def change(manifest):
        manifest["written_by"] = {"tool": "someone else"}
        del manifest["metadata"]
        for info in manifest["layers"].values():
            for key in ("zero_point", "rotation", "rotation_seed", "fit_options"):
                if info["spec"][key] in ("int", None, 0):
                    del info["spec"][key]

    edit(saved, change)
    assert torch.equal(outputs(lowbit.load(saved, Tiny())), outputs(model))


def test_an_edited_spec_that_still_fits_the_tensors_is_refused(model, saved):
    # group_size 16 -> 17 on 32 inputs gives the same two groups per row: the tensors fit, the
    # model would silently differ. The tensors file's header (covered by the sha256) records
    # the layer entries it was saved with.
    def change(manifest):
        manifest["layers"]["model.layers.0.mlp.up_proj"]["spec"]["group_size"] = 17

    edit(saved, change)
    skeleton = Tiny()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(ValueError, match=r"up_proj.*spec\.group_size.*edited"):
        lowbit.load(saved, skeleton)
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())
    with pytest.raises(ValueError, match="group_size"):
        verify(saved)


def test_files_saved_before_the_header_recorded_layers_still_load(model, saved):
    from safetensors.torch import load_file, save_file

    tensors = saved / "model.safetensors"
    save_file(load_file(str(tensors)), str(tensors), metadata={"format": "lowbit"})

    def change(manifest):
        manifest["sha256"] = hashlib.sha256(tensors.read_bytes()).hexdigest()

    edit(saved, change)
    assert torch.equal(outputs(lowbit.load(saved, Tiny())), outputs(model))


def test_zero_width_layers_still_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 0))
    quantize_model(model, QuantSpec(bits=4), progress=False)
    lowbit.save(model, tmp_path / "z")
    loaded = lowbit.load(tmp_path / "z", nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 0)))
    assert loaded[0].in_features == 0 and loaded[1].out_features == 0


# (b) Random edits of a real manifest: a load either gives the original model, or refuses
# with a ValueError and leaves the skeleton as it was.


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    torch.manual_seed(0)
    model = quantized_tiny()
    directory = lowbit.save(model, tmp_path_factory.mktemp("orig") / "ckpt")
    return directory, json.loads((directory / "lowbit.json").read_text()), outputs(model)


def node_paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from node_paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from node_paths(value, (*prefix, i))


def subtrees(tree):
    """Every container and number of the original manifest: plausible-looking substitutes."""
    found = []
    for path in node_paths(tree):
        node = tree
        for key in path:
            node = node[key]
        if isinstance(node, (dict, list, int, float)):
            found.append(node)
    return found


ODD_STRINGS = [
    "",
    ".",
    "..",
    "../ckpt/model.safetensors",
    "/etc/hostname",
    "lowbit.json",
    "model.safetensors",
    "float64",
    "nope.weight",
    "emb.weight",
    "again",
    "shared",
    UP,
    "hadamard",
    "0" * 64,
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.sampled_from(ODD_STRINGS)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
DEEP = st.integers(1, 40).map(lambda n: json.loads("[" * n + "]" * n))


@st.composite
def edited(draw, manifest):
    tree = copy.deepcopy(manifest)
    pool = subtrees(manifest)
    values = VALUES | DEEP | st.sampled_from(pool).map(copy.deepcopy)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(node_paths(tree))))
        parent = None
        node = tree
        for key in path:
            parent, node = node, node[key]
        ops = ["replace"]
        if path:
            ops.append("delete")
        if isinstance(node, (dict, list)):
            ops.append("add")
        if path and isinstance(node, (int, float)) and not isinstance(node, bool):
            ops.append("number")
        op = draw(st.sampled_from(ops))
        if op == "replace" and not path:
            tree = draw(values)
        elif op == "replace":
            parent[path[-1]] = draw(values)
        elif op == "delete":
            del parent[path[-1]]
        elif op == "add" and isinstance(node, dict):
            key = draw(st.sampled_from(["also_at", "metadata", "x", "bias"]) | st.text(max_size=4))
            node[key] = draw(values)
        elif op == "add":
            node.insert(draw(st.integers(0, len(node))), draw(values))
        else:
            n = node
            nearby = [n + 1, n - 1, -n, 0, 2 * n, float(n) + 0.5, 2**64]
            parent[path[-1]] = draw(
                st.sampled_from([v for v in nearby if math.isfinite(v)])
                | st.integers(-(2**63), 2**63)
            )
    return tree


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_manifest_edits_load_exactly_or_raise_value_error(original, data):
    directory, manifest, reference = original
    tree = data.draw(edited(manifest))
    with tempfile.TemporaryDirectory(dir=directory.parent) as scratch:
        target = Path(scratch)
        shutil.copyfile(directory / "model.safetensors", target / "model.safetensors")
        (target / "lowbit.json").write_text(json.dumps(tree, allow_nan=False))
        skeleton = Tiny()
        before = snapshot(skeleton)
        try:
            loaded = lowbit.load(target, skeleton)
        except ValueError:
            assert_unchanged(skeleton, before)
            return
        except FileNotFoundError:
            # A tensors file that is not there: the documented error, naming it.
            name = tree["tensors_file"]
            assert name != "model.safetensors" and not (target / name).exists()
            assert_unchanged(skeleton, before)
            return
        assert loaded is skeleton
        assert torch.equal(outputs(loaded), reference)
