"""lowbit.modules: linear layers and weights, tied and shared modules, patterns, module swaps;
and the import layering around it."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.modules import (
    check_pattern,
    linear_weight,
    match_pattern,
    other_names,
    replace_modules,
    set_submodule,
    tied_owners,
)


class Conv1D(nn.Module):
    """Hugging Face's Conv1D as lowbit sees it: ``nf`` outputs, weight stored ``[in, out]``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight)


class SubLinear(nn.Linear):
    pass


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 10, bias=False)
        self.lm_head.weight = self.embed.weight


# --- linear_weight ----------------------------------------------------------------------------


def test_linear_weight_of_a_linear_is_its_weight():
    layer = nn.Linear(6, 4)
    assert linear_weight(layer) is layer.weight


def test_linear_weight_of_a_conv1d_is_its_transpose():
    layer = Conv1D(4, 6)  # 6 inputs, 4 outputs
    weight = linear_weight(layer)
    assert weight.shape == (4, 6)
    assert torch.equal(weight, layer.weight.t())
    assert weight.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ weight.T + layer.bias)


@pytest.mark.parametrize(
    "module", [nn.Conv1d(4, 4, 1), nn.Embedding(4, 4), nn.Sequential(nn.Linear(2, 2)), nn.ReLU()]
)
def test_linear_weight_of_other_modules_is_none(module):
    assert linear_weight(module) is None


def test_linear_subclasses_are_not_taken():
    # Their forward may read .weight itself, so they cannot be swapped for a quantized layer.
    assert linear_weight(SubLinear(4, 4)) is None


# --- tied and shared modules ------------------------------------------------------------------


def test_tied_owners_names_the_float_module_holding_the_weight():
    assert tied_owners(TiedLM()) == {"lm_head": "embed"}


def test_linear_layers_sharing_a_weight_are_not_tied():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert tied_owners(model) == {}


def test_meta_weights_are_never_tied():
    with torch.device("meta"):
        model = TiedLM()
    assert tied_owners(model) == {}


def test_other_names_lists_every_further_name_of_a_shared_module():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared), shared)
    assert other_names(model) == {"0": ["2.0", "3"]}
    assert other_names(nn.Sequential(nn.Linear(2, 2))) == {}


# --- patterns ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, name, expected",
    [
        ("*.mlp.*", "blocks.0.mlp.up", True),
        ("*.mlp.*", "lm_head", False),
        ("blocks.?.attn", "blocks.1.attn", True),
        ("lm_[", "lm_[", True),  # an unclosed '[' is a literal in a glob
        (r"re:blocks\.\d+\.mlp", "blocks.12.mlp", True),
        ("re:attn", "blocks.0.attn.q", False),  # a regex matches the whole name
        ("re:.*attn.*", "blocks.0.attn.q", True),
        ("mlp", "blocks.0.mlp", False),  # so does a glob
    ],
)
def test_match_pattern(pattern, name, expected):
    assert match_pattern(pattern, name) is expected


@pytest.mark.parametrize("pattern", ["re:[", "re:(a", "re:*x"])
def test_a_bad_regex_is_a_value_error_naming_the_pattern(pattern):
    with pytest.raises(ValueError, match="not a valid regular expression") as info:
        match_pattern(pattern, "x")
    assert repr(pattern) in str(info.value)
    with pytest.raises(ValueError, match=r"^exclude pattern ") as info:
        check_pattern(pattern, "exclude pattern")
    assert repr(pattern) in str(info.value)


@pytest.mark.parametrize(
    "pattern, match", [("", "empty name pattern"), ("re:", "empty regular expression")]
)
def test_empty_patterns_are_refused(pattern, match):
    with pytest.raises(ValueError, match=match):
        check_pattern(pattern)
    with pytest.raises(ValueError, match=match):
        match_pattern(pattern, "")


def test_patterns_and_names_must_be_strings():
    with pytest.raises(TypeError, match="rules pattern must be a str"):
        check_pattern(3, "rules pattern")
    with pytest.raises(TypeError, match="must be str"):
        match_pattern("*", None)


# --- set_submodule / replace_modules ----------------------------------------------------------


def nested():
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.Sequential(nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU())),
        nn.Linear(8, 2),
    )


def test_set_submodule_replaces_one_name():
    model = nested()
    new = nn.Identity()
    set_submodule(model, "1.1.0", new)
    assert model[1][1][0] is new
    with pytest.raises(ValueError, match="model itself"):
        set_submodule(model, "", new)


def test_replace_modules_in_a_nested_model():
    model = nested()
    kept = model[1][0]
    a, b = nn.Identity(), nn.Tanh()
    replace_modules(model, {"1.1.0": a, "2": b})
    assert model[1][1][0] is a and model[2] is b and model[1][0] is kept
    assert model(torch.randn(3, 4)).shape == (3, 8)


def test_a_shared_module_is_replaced_under_every_name():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Sequential(shared), shared)
    new = nn.Identity()
    replace_modules(model, {"1.0": new})  # any of its names will do
    assert model[0] is new and model[1][0] is new and model[2] is new
    assert not any(m is shared for m in model.modules())


def test_skip_keeps_a_shared_module_under_some_names():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Sequential(shared))
    new = nn.Identity()
    replace_modules(model, {"0": new}, skip=lambda name: name == "1.0")
    assert model[0] is new and model[1][0] is shared


def test_names_of_one_module_given_the_same_replacement_are_fine():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, shared)
    new = nn.Identity()
    replace_modules(model, {"0": new, "1": new})
    assert model[0] is new and model[1] is new


def test_every_name_false_replaces_the_given_names_only():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, shared, shared)
    a, b = nn.Identity(), nn.Tanh()
    replace_modules(model, {"0": a, "2": b}, every_name=False)
    assert model[0] is a and model[1] is shared and model[2] is b
    with pytest.raises(ValueError, match=r"no module named '7'"):
        replace_modules(model, {"1": a, "7": b}, every_name=False)
    assert model[1] is shared


@pytest.mark.parametrize(
    "replacements, error, match",
    [
        ({"1.5": nn.Identity()}, ValueError, r"no module named '1\.5'"),
        ({"0": nn.Identity(), "nope": nn.Identity()}, ValueError, r"no module named 'nope'"),
        ({"": nn.Identity()}, ValueError, "model itself"),
        ({"0": torch.zeros(2)}, TypeError, r"replacement for '0' must be an nn\.Module"),
        ({0: nn.Identity()}, TypeError, "names must be str"),
    ],
)
def test_bad_replacements_leave_the_model_unchanged(replacements, error, match):
    model = nested()
    before = list(model.named_modules())
    with pytest.raises(error, match=match):
        replace_modules(model, {"2": nn.Identity(), **replacements})
    assert list(model.named_modules()) == before


def test_two_replacements_for_one_shared_module_are_refused():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, shared)
    with pytest.raises(ValueError, match="shared"):
        replace_modules(model, {"0": nn.Identity(), "1": nn.Tanh()})
    assert model[0] is shared and model[1] is shared


# --- layering ---------------------------------------------------------------------------------

SOURCE = Path(__file__).resolve().parents[1] / "src" / "lowbit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every lowbit module ``path`` imports, anywhere in the file (lazy imports too), as full
    names: ``from lowbit.io import checkpoint`` counts as ``lowbit.io.checkpoint``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text("utf-8"))
    # Imports under ``if TYPE_CHECKING:`` are for annotations only: no runtime edge.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: ``from ..x import y`` inside package a.b is a.x.y
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "lowbit" or name.startswith("lowbit.")}


def _all_imports() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(SOURCE.rglob("*.py"))}


def _imports_any(imported: set[str], banned: str) -> bool:
    return any(name == banned or name.startswith(banned + ".") for name in imported)


def test_the_layering_check_sees_every_module_and_lazy_imports():
    modules = _all_imports()
    assert {"lowbit.modules", "lowbit.dtypes", "lowbit.calibrate", "lowbit.fit.search"} <= set(
        modules
    )
    assert "lowbit.model" in modules["lowbit.cli"]  # imported inside a function only


@pytest.mark.parametrize("low", ["lowbit.modules", "lowbit.dtypes"])
@pytest.mark.parametrize("high", ["lowbit.model", "lowbit.quantize", "lowbit.io", "lowbit.cli"])
def test_low_modules_do_not_import_high_ones(low, high):
    assert not _imports_any(_all_imports()[low], high)


def test_calibrate_and_fit_do_not_import_model_or_tensor():
    for name, imported in _all_imports().items():
        if name == "lowbit.calibrate" or name == "lowbit.fit" or name.startswith("lowbit.fit."):
            for banned in ("lowbit.model", "lowbit.tensor"):
                assert not _imports_any(imported, banned), f"{name} imports {banned}"


def _component(name: str) -> str:
    """``lowbit.fit.search`` -> ``lowbit.fit``; the unit the layering is about."""
    return ".".join(name.split(".")[:2])


def test_components_import_each_other_without_cycles():
    # A cycle between components means one of its imports points up the layering. The root
    # package (which re-exports the public API) and ``__main__`` stand outside it.
    graph: dict[str, set[str]] = {}
    for name, imported in _all_imports().items():
        source = _component(name)
        if source in ("lowbit", "lowbit.__main__"):
            continue
        targets = {_component(t) for t in imported} - {source, "lowbit"}
        graph.setdefault(source, set()).update(targets)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert {"lowbit.spec", "lowbit.grids", "lowbit.layouts", "lowbit.rounding"} <= set(graph)
