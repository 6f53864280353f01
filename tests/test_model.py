"""quantize_model on small real models: rules, exclusions, tied weights, errors, the Report."""

from __future__ import annotations

import io
import json
import math
import sys

import pytest
import torch
import tqdm.std
from torch import nn

import lowbit.model as lowbit_model
from lowbit import QuantLinear, QuantSpec, Report, quantize, quantize_model
from lowbit.model import match_pattern, model_bytes, resolve_specs, weight_error

S2 = QuantSpec(bits=2, group_size=8)
S4 = QuantSpec(bits=4, group_size=16, symmetric=True)
S8 = QuantSpec(bits=8)
SCALE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return torch.tanh(self.q(x)) * self.k(x)


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.mlp = MLP(dim)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class TinyLM(nn.Module):
    """Embedding, two blocks, an output head (optionally tied to the embedding)."""

    def __init__(self, vocab=40, dim=32, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


LM_LINEARS = [
    "blocks.0.attn.q",
    "blocks.0.attn.k",
    "blocks.0.mlp.up",
    "blocks.0.mlp.down",
    "blocks.1.attn.q",
    "blocks.1.attn.k",
    "blocks.1.mlp.up",
    "blocks.1.mlp.down",
    "lm_head",
]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8, bias=False)
    )


def tiny_lm(tie=False):
    torch.manual_seed(0)
    return TinyLM(tie=tie)


def quant(model, rules, *args, **kwargs):
    kwargs.setdefault("progress", False)
    return quantize_model(model, rules, *args, **kwargs)


def snapshot(model):
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return modules, state


def assert_untouched(model, snap):
    modules, state = snap
    now = dict(model.named_modules())
    assert now.keys() == modules.keys()
    for name, module in now.items():
        assert module is modules[name], name
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    now_state = model.state_dict()
    assert now_state.keys() == state.keys()
    for key, value in state.items():
        now_value = now_state[key]
        same = (now_value == value) | (now_value.isnan() & value.isnan())
        assert now_value.shape == value.shape and bool(same.all()), key


def bits_per_weight(shape, spec):
    rows, cols = shape
    groups = cols // spec.group_size if spec.granularity == "group" else 1
    scale_rows = 1 if spec.granularity == "tensor" else rows
    bits = rows * math.ceil(cols * spec.bits / 8) * 8
    bits += scale_rows * groups * SCALE_BYTES[spec.scale_dtype] * 8
    if not spec.symmetric:
        bits += scale_rows * math.ceil(groups * spec.bits / 8) * 8
    return bits / (rows * cols)


def unique_bytes(model):
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --- which layers get which spec --------------------------------------------------------------


def test_one_spec_for_every_linear():
    model = mlp()
    x = torch.randn(5, 16)
    before = model(x)
    report = quant(model, S8)
    assert [type(model[i]) for i in (0, 2, 4)] == [QuantLinear] * 3
    assert isinstance(model[1], nn.ReLU)
    assert [row.name for row in report.layers] == ["0", "2", "4"]
    assert all(row.spec == S8.label and row.skipped is None for row in report.layers)
    after = model(x)
    assert ((after - before).norm() / before.norm()).item() < 2e-2


def test_first_matching_rule_wins():
    model = tiny_lm()
    report = quant(model, {"blocks.0.*": S4, "*.mlp.*": S8, "*": S2})
    want = {
        "blocks.0.attn.q": S4,
        "blocks.0.attn.k": S4,
        "blocks.0.mlp.up": S4,
        "blocks.0.mlp.down": S4,
        "blocks.1.attn.q": S2,
        "blocks.1.attn.k": S2,
        "blocks.1.mlp.up": S8,
        "blocks.1.mlp.down": S8,
        "lm_head": S2,
    }
    for name, spec in want.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.spec == spec, name
    assert {row.name: row.spec for row in report.layers} == {n: s.label for n, s in want.items()}


def test_none_keeps_a_layer_in_float():
    model = tiny_lm()
    head = model.lm_head.weight.detach().clone()
    report = quant(model, {"lm_head": None, "*": S4})
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model.lm_head.weight, head)
    row = report.layers[-1]
    assert (row.name, row.spec, row.skipped) == ("lm_head", None, "rule 'lm_head'")
    assert row.bits_per_weight == 32.0 and row.rel_error is None
    assert len(report.quantized) == 8 and [r.name for r in report.skipped] == ["lm_head"]


def test_regex_and_glob_patterns():
    model = tiny_lm()
    report = quant(model, {r"re:blocks\.\d+\.attn\.(q|k)": S4, "*.down": S8})
    quantized = {r.name for r in report.quantized}
    assert quantized == {n for n in LM_LINEARS if ".attn." in n or n.endswith(".down")}
    for name in LM_LINEARS:
        is_q = isinstance(model.get_submodule(name), QuantLinear)
        assert is_q == (name in quantized), name
    assert {r.name: r.skipped for r in report.skipped} == {
        "blocks.0.mlp.up": "no rule",
        "blocks.1.mlp.up": "no rule",
        "lm_head": "no rule",
    }


def test_pattern_matching():
    assert match_pattern("*.mlp.*", "blocks.0.mlp.up")
    assert not match_pattern("*.mlp.*", "lm_head")
    assert match_pattern("blocks.?.attn.q", "blocks.1.attn.q")
    assert not match_pattern("Blocks.*", "blocks.1.attn.q")
    assert match_pattern(r"re:blocks\.[01]\.mlp\.(up|down)", "blocks.1.mlp.down")
    assert not match_pattern("re:attn", "blocks.0.attn.q"), "regexes match the whole name"
    assert match_pattern("re:.*attn.*", "blocks.0.attn.q")
    assert resolve_specs("x", S4) == ((S4,), None, None)
    assert resolve_specs("lm_head", {"lm_head": None, "*": S4}) == ((), "rule 'lm_head'", "lm_head")
    assert resolve_specs("y", {"x": S4}) == ((), "no rule", None)
    assert resolve_specs("y", {"y": [S4, S4]}) == ((S4, S4), None, "y")


def test_unmatched_layers_stay_linear():
    model = tiny_lm()
    report = quant(model, {"lm_head": S8})
    assert isinstance(model.lm_head, QuantLinear)
    for name in LM_LINEARS[:-1]:
        assert type(model.get_submodule(name)) is nn.Linear
    assert [r.name for r in report.quantized] == ["lm_head"]
    assert all(r.skipped == "no rule" for r in report.skipped)


@pytest.mark.parametrize("exclude", ["lm_head", ["lm_head", "*.attn.*"], ("re:.*head",)])
def test_exclude_beats_the_rules(exclude):
    model = tiny_lm()
    report = quant(model, {"*": S4, "lm_head": S8}, exclude)
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    for name in LM_LINEARS:
        excluded = any(match_pattern(p, name) for p in patterns)
        assert (type(model.get_submodule(name)) is nn.Linear) == excluded, name
    for row in report.skipped:
        assert row.skipped == "excluded"
    assert "lm_head" in {r.name for r in report.skipped}


def test_layer_kwargs_reach_the_layers():
    model = mlp()
    quant(model, S4, kernel="dequantize", cache_dequantized=True)
    for i in (0, 2, 4):
        assert model[i].kernel == "dequantize" and model[i].cache_dequantized


def test_an_already_quantized_model_is_refused():
    model = mlp()
    quant(model, S8)
    layers = [model[i] for i in (0, 2, 4)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"already quantized: 3 QuantLinear layers.*'0', '2', '4'"):
        quant(model, S2)
    assert [model[i] for i in (0, 2, 4)] == layers
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_second_run_with_the_same_exclusion_is_refused():
    # The CLI's case: lm_head excluded both times, so one float layer is left, but excluded.
    model = tiny_lm()
    quant(model, S4, exclude=["lm_head"])
    with pytest.raises(ValueError, match="already quantized: 8 QuantLinear layers"):
        quant(model, S4, exclude=["lm_head"])
    assert type(model.lm_head) is nn.Linear


def test_rules_selecting_only_quantized_layers_are_refused():
    model = tiny_lm()
    quant(model, {"blocks.0.*": S4})
    with pytest.raises(ValueError, match="already quantized: 4 QuantLinear layers"):
        quant(model, {"blocks.0.*": S2})
    assert all(model.get_submodule(n).spec == S4 for n in LM_LINEARS if n.startswith("blocks.0"))


def test_a_partly_quantized_model_gets_the_rest_quantized():
    model = tiny_lm()
    quant(model, {"blocks.0.*": S4})
    first = {n: model.get_submodule(n) for n in LM_LINEARS if n.startswith("blocks.0")}
    codes = {n: layer.packed.clone() for n, layer in first.items()}
    report = quant(model, S8)
    assert [r.name for r in report.layers] == LM_LINEARS
    for name, layer in first.items():
        assert model.get_submodule(name) is layer and torch.equal(layer.packed, codes[name])
        row = next(r for r in report.layers if r.name == name)
        assert row.skipped == f"already quantized ({S4.label})" and row.spec is None
        assert row.bits_per_weight == layer.quantized_weight.bits_per_weight
    rest = [n for n in LM_LINEARS if n not in first]
    assert [r.name for r in report.quantized] == rest
    assert all(model.get_submodule(n).spec == S8 for n in rest)
    assert report.warnings == []


def test_progress_bar_does_not_change_the_result():
    a, b = mlp(), mlp()
    quantize_model(a, S4, progress=True)
    quant(b, S4)
    x = torch.randn(3, 16)
    assert torch.equal(a(x), b(x))


# --- shared modules and tied weights --------------------------------------------------------


def test_a_module_used_under_two_names_is_replaced_everywhere():
    model = mlp()
    model.alias = model[2]
    report = quant(model, S8)
    assert isinstance(model.alias, QuantLinear) and model.alias is model[2]
    assert [r.name for r in report.layers] == ["0", "2", "4"]


def test_two_linears_sharing_one_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False))
    model[1].weight = model[0].weight
    report = quant(model, S4)
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], QuantLinear)
    assert torch.equal(model[0].dequantize_weight(), model[1].dequantize_weight())
    assert report.parameters == 256
    assert report.bytes_before == 256 * 4


def test_tied_embedding_and_head():
    model = tiny_lm(tie=True)
    embed = model.embed.weight.detach().clone()
    params = sum(p.numel() for p in model.parameters())
    bytes_before = unique_bytes(model)
    report = quant(model, {"*": S4}, quantize_tied=True)
    assert isinstance(model.lm_head, QuantLinear)
    assert torch.equal(model.embed.weight, embed)
    assert report.parameters == params
    assert report.bytes_before == bytes_before
    assert report.bytes_after == unique_bytes(model)
    # The tied matrix stays (the embedding keeps it); the head adds its quantized copy.
    saved = sum(
        r.shape[0] * r.shape[1] * 4 - model.get_submodule(r.name).quantized_weight.nbytes
        for r in report.quantized
        if r.name != "lm_head"
    )
    head = model.lm_head.quantized_weight.nbytes
    assert report.bytes_after == bytes_before - saved + head
    ids = torch.randint(0, 40, (2, 5))
    assert model(ids).shape == (2, 5, 40)


# --- errors leave the model untouched -------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("spec", [S2, S4, S8, QuantSpec(bits=8, symmetric=True)])
def test_non_finite_weights_name_the_layer(bad, spec):
    model = tiny_lm()
    with torch.no_grad():
        model.blocks[1].mlp.down.weight[3, 5] = bad
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.down.*NaN or Inf"):
        quant(model, spec)
    assert_untouched(model, snap)


def test_non_finite_weights_in_float_layers_are_fine():
    model = tiny_lm()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    quant(model, {"lm_head": None, "*": S4})
    quant(tiny_lm(), S4, exclude="lm_head")


def test_group_size_that_does_not_divide_in_features():
    # A partial last group per row: quantized, saved and restored like any other layer.
    model = tiny_lm()
    x = torch.randint(0, 40, (2, 7))
    report = quant(model, {"*.down": QuantSpec(bits=4, group_size=48), "*": S8})
    down = [r for r in report.layers if r.name.endswith("mlp.down")]
    assert down and all(0 < r.rel_error < 0.2 for r in down)
    assert torch.isfinite(model(x)).all()


def test_bits_out_of_range_names_bits_and_the_rule():
    model = tiny_lm()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"rules entry 'lm_head'.*bits=1"):
        quant(model, {"lm_head": QuantSpec(bits=1), "*": S4})
    assert_untouched(model, snap)


def test_integer_weights_raise_type_error():
    model = mlp()
    model[2].weight = nn.Parameter(torch.ones(32, 32, dtype=torch.int32), requires_grad=False)
    snap = snapshot(model)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quant(model, S4)
    assert_untouched(model, snap)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        quant(torch.randn(4, 4), S4)
    with pytest.raises(TypeError, match="rules"):
        quant(mlp(), "int4")
    with pytest.raises(TypeError, match="rules entry"):
        quant(mlp(), {"*": "int4"})
    with pytest.raises(TypeError, match="rules entry"):
        quant(mlp(), {3: S4})


# --- the report ------------------------------------------------------------------------------


@pytest.fixture
def quantized_lm():
    model = tiny_lm()
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in LM_LINEARS}
    params = sum(p.numel() for p in model.parameters())
    bytes_before = unique_bytes(model)
    specs = {"*.attn.*": S4, "*.mlp.*": S2, "blocks.*": S8, "lm_head": None}
    report = quant(model, specs, exclude=["blocks.1.mlp.up"])
    return model, report, originals, params, bytes_before


def test_report_rows(quantized_lm):
    model, report, originals, _, _ = quantized_lm
    assert [r.name for r in report.layers] == LM_LINEARS
    for row in report.layers:
        w = originals[row.name]
        assert row.shape == tuple(w.shape)
        if row.skipped is not None:
            assert row.spec is None and row.bits_per_weight == 32.0
            continue
        layer = model.get_submodule(row.name)
        assert row.spec == layer.spec.label
        assert row.bits_per_weight == pytest.approx(bits_per_weight(row.shape, layer.spec))
        w64 = w.double()
        rel = ((w64 - layer.dequantize_weight().double()).norm() / w64.norm()).item()
        assert row.rel_error == pytest.approx(rel, rel=1e-4)
        assert row.sqnr_db == pytest.approx(-20 * math.log10(rel), rel=1e-4)
    skipped = {r.name: r.skipped for r in report.skipped}
    assert skipped == {"blocks.1.mlp.up": "excluded", "lm_head": "rule 'lm_head'"}


def test_report_totals(quantized_lm):
    model, report, _, params, bytes_before = quantized_lm
    assert report.parameters == params
    assert report.bytes_before == bytes_before == model_bytes(tiny_lm())
    assert report.bytes_after == unique_bytes(model)
    # The same total from the specs: float parts + each quantized layer's codes/scales/zeros.
    quantized_weights = sum(r.shape[0] * r.shape[1] for r in report.quantized)
    stored_bits = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in report.quantized)
    assert report.bytes_after == bytes_before - 4 * quantized_weights + stored_bits / 8
    assert report.bytes_after < report.bytes_before
    assert report.avg_bits_per_weight == pytest.approx(stored_bits / quantized_weights)
    errors = [r.rel_error for r in report.quantized]
    assert report.mean_rel_error == pytest.approx(sum(errors) / len(errors))
    assert report.seconds >= 0


def test_report_serialises(quantized_lm):
    _, report, _, _, _ = quantized_lm
    data = json.loads(report.to_json())
    assert json.loads(report.to_json(indent=None)) == data
    assert "\n" not in report.to_json(indent=None)
    assert [row["name"] for row in data["layers"]] == LM_LINEARS
    for row, got in zip(report.layers, data["layers"], strict=True):
        assert got["shape"] == list(row.shape)
        assert got["spec"] == row.spec and got["skipped"] == row.skipped
        assert got["bits_per_weight"] == row.bits_per_weight
        assert got["rel_error"] == row.rel_error and got["sqnr_db"] == row.sqnr_db
    totals = data["totals"]
    assert totals["layers_quantized"] == 7 and totals["layers_skipped"] == 2
    assert totals["bytes_before"] == report.bytes_before
    assert totals["bytes_after"] == report.bytes_after
    assert totals["parameters"] == report.parameters
    assert totals["avg_bits_per_weight"] == report.avg_bits_per_weight
    assert totals["mean_rel_error"] == report.mean_rel_error
    assert report.to_dict()["totals"] == totals


def test_report_table(quantized_lm):
    _, report, _, _, _ = quantized_lm
    table = report.table()
    assert str(report) == table
    for row in report.layers:
        assert row.name in table
    assert "kept: excluded" in table and "kept: rule 'lm_head'" in table
    assert "quantized 7 layers, kept 2 in full precision" in table
    worst = sorted(report.quantized, key=lambda r: -r.rel_error)[:2]
    short = report.table(max_rows=2)
    assert "2 of 9 layers shown" in short
    body = short.split("quantized 7 layers")[0]
    for row in report.layers:
        assert (row.name + " " in body) == (row in worst), row.name


def test_exact_and_empty_reports():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    report = quant(model, QuantSpec(bits=4))
    row = report.layers[0]
    assert row.rel_error == 0.0 and row.sqnr_db == math.inf
    text = report.to_json()
    assert "Infinity" not in text  # strict JSON: an exact layer's SQNR is null
    assert json.loads(text)["layers"][0]["sqnr_db"] is None
    assert json.loads(text)["layers"][0]["config"]["grid"] == "int"
    empty = quant(nn.Sequential(nn.ReLU()), S4)
    assert empty.layers == [] and empty.avg_bits_per_weight == 0.0 and empty.mean_rel_error == 0.0
    assert "quantized 0 layers" in empty.table()
    assert isinstance(empty, Report)


def test_weight_error():
    w = torch.tensor([3.0, 4.0])
    rel, sqnr = weight_error(w, torch.tensor([3.0, 4.05]))
    assert rel == pytest.approx(0.01, rel=1e-4) and sqnr == pytest.approx(40.0, rel=1e-4)
    assert weight_error(w, w.clone()) == (0.0, math.inf)
    assert weight_error(torch.zeros(3), torch.zeros(3)) == (0.0, math.inf)
    assert weight_error(torch.zeros(3), torch.ones(3)) == (math.inf, -math.inf)


def test_fp16_model_float_rows_report_16_bits():
    model = mlp().half()
    bytes_before = unique_bytes(model)
    report = quant(model, {"0": S4})
    assert [r.bits_per_weight for r in report.skipped] == [16.0, 16.0]
    assert report.bytes_before == bytes_before
    assert report.bytes_after == unique_bytes(model)
    assert model[0].dequantize_weight().dtype == torch.float16


def test_tied_head_is_kept_float_by_default():
    model = tiny_lm(tie=True)
    before = unique_bytes(model)
    report = quant(model, {"*": S4})
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight
    assert [(r.name, r.skipped) for r in report.skipped] == [("lm_head", "tied to embed")]
    assert report.bytes_after < before


def test_patterns_that_match_nothing_are_reported():
    model = nn.Sequential(nn.Linear(16, 16))
    report = quant(model, {"0": S4, "lm-head": None}, exclude=["nothing.*"])
    assert report.warnings == [
        "pattern 'nothing.*' matched no layer",
        "pattern 'lm-head' matched no layer",
    ]


def test_linear_subclasses_are_listed_as_kept():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(16, 16), nn.Linear(16, 8))
    report = quant(model, S4)
    assert type(model[0]) is MyLinear and isinstance(model[1], QuantLinear)
    assert [(r.name, r.skipped) for r in report.skipped] == [("0", "MyLinear (nn.Linear subclass)")]


def test_candidate_specs_keep_the_most_accurate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    candidates = [S2, S4, S8]
    report = quant(model, {"*": candidates})
    assert [r.spec for r in report.quantized] == [S8.label, S8.label]
    for row in report.quantized:
        layer = model.get_submodule(row.name)
        assert layer.spec == S8


def test_report_code_entropy(quantized_lm):
    model, report, _, _, _ = quantized_lm
    from lowbit.entropy import code_histogram, entropy_bits

    for row in report.quantized:
        layer = model.get_submodule(row.name)
        codes = layer.quantized_weight.codes()
        counts = code_histogram(codes, 1 << layer.spec.bits)
        assert row.code_entropy == pytest.approx(entropy_bits(counts).item(), abs=1e-5)
        assert 0.0 <= row.code_entropy <= layer.spec.bits + 1e-6
    sizes = [r.shape[0] * r.shape[1] for r in report.quantized]
    expected = sum(r.code_entropy * n for r, n in zip(report.quantized, sizes, strict=True))
    assert report.avg_code_entropy == pytest.approx(expected / sum(sizes))
    assert report.to_dict()["totals"]["avg_code_entropy"] == report.avg_code_entropy
    assert "codes' entropy" in report.table() and "H bits" in report.table()


def test_code_entropy_of_known_codes():
    # Codes 0..15 equally often: 4 bits; a constant tensor: one code, 0 bits.
    w = torch.arange(16, dtype=torch.float32).repeat(4, 2)
    qt = quantize(w, QuantSpec(bits=4, granularity="tensor"))
    assert qt.code_entropy() == pytest.approx(4.0)
    assert quantize(torch.ones(4, 32), QuantSpec(bits=4)).code_entropy() == 0.0


# --- rules, patterns and arguments are checked before anything is touched ---------------------


def untouched_after(model, call, error, match):
    """``call()`` raises ``error`` matching ``match`` and leaves ``model`` as it was."""
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        call()
    assert_untouched(model, snap)


@pytest.mark.parametrize(
    "rules, exclude, match",
    [
        ({"re:[": S4}, (), r"rules pattern 're:\['.*regular expression"),
        # A bad pattern behind a rule that already matches every layer is still an error.
        ({"*": S4, "re:(": S8}, (), r"rules pattern 're:\('"),
        (S4, ["re:["], r"exclude pattern 're:\['.*regular expression"),
        (S4, "re:*x", r"exclude pattern 're:\*x'"),
        ({"": S4}, (), "empty name pattern"),
        (S4, ["re:"], "empty regular expression"),
    ],
)
def test_bad_patterns_raise_value_errors_naming_them(rules, exclude, match):
    model = tiny_lm()
    untouched_after(model, lambda: quant(model, rules, exclude), ValueError, match)
    with pytest.raises(ValueError, match=match):
        lowbit_model.check_rules(rules, exclude)


@pytest.mark.parametrize(
    "rules, exclude, error, match",
    [
        ({3: S4}, (), TypeError, r"rules entry 3: keys must be name patterns \(str"),
        ({"*": "int4"}, (), TypeError, r"rules entry '\*'.*got str 'int4'"),
        ({"*": []}, (), TypeError, r"rules entry '\*'.*got an empty list"),
        ({"*": [S4, None]}, (), TypeError, r"rules entry '\*'.*non-empty list of QuantSpec"),
        ({"*": {S4}}, (), TypeError, r"rules entry '\*'"),
        ("int4", (), TypeError, "rules must be a QuantSpec or a dict"),
        (S4, 3, TypeError, "exclude must be a list of name patterns"),
        (S4, ["lm_head", 3], TypeError, r"exclude pattern must be a str.*got 3"),
        (S4, {"lm_head": 1}, TypeError, "exclude must be a list of name patterns"),
        (
            {"*": QuantSpec(bits=4, fit="mse", fit_options={"tries": 3})},
            (),
            ValueError,
            r"rules entry '\*' \(int4 channel asym mse\).*no option",
        ),
        ({"*": QuantSpec(bits=4, grid="int5")}, (), ValueError, r"rules entry '\*'.*unknown grid"),
        (QuantSpec(bits=4, fit="best"), (), ValueError, r"rules: unknown fit 'best'"),
    ],
)
def test_bad_rules_are_refused_before_any_layer(rules, exclude, error, match):
    model = tiny_lm()
    untouched_after(model, lambda: quant(model, rules, exclude), error, match)
    with pytest.raises(error, match=match):
        lowbit_model.check_rules(rules, exclude)


def test_check_rules_accepts_what_quantize_model_takes():
    for rules, exclude in [
        (S4, ()),
        ({"*.mlp.*": [S4, S8], "re:blocks\\.[0-9]+\\..*": S2, "lm_head": None}, ["lm_head"]),
        (S8, "lm_head"),
        (S8, None),
    ]:
        assert lowbit_model.check_rules(rules, exclude) is None
    assert lowbit_model.match_pattern("lm_[", "lm_[")  # an unclosed '[' is literal in a glob
    with pytest.raises(ValueError, match=r"'re:\['"):
        match_pattern("re:[", "x")
    with pytest.raises(TypeError, match="rules entry 'y'"):
        resolve_specs("y", {"y": []})


def test_fit_options_are_checked_before_the_first_layer(monkeypatch):
    # Fail fast: a typo in the last rule must not cost a quantization of the other layers.
    calls = []
    real = lowbit_model.quantize
    monkeypatch.setattr(lowbit_model, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_lm()
    bad = QuantSpec(bits=4, fit="mse", fit_options={"nope": 1})
    untouched_after(model, lambda: quant(model, {"blocks.*": S4, "*": bad}), ValueError, "nope")
    assert calls == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"progress": "yes"}, TypeError, "progress must be True, False or None"),
        ({"quantize_tied": "no"}, TypeError, "quantize_tied must be a bool"),
        ({"choose": "best"}, ValueError, r"choose must be one of \('error', 'size_adjusted'\)"),
        ({"kernal": "dequantize"}, TypeError, r"unexpected keyword argument\(s\) \['kernal'\]"),
        ({"kernel": "fastest"}, ValueError, "unknown kernel 'fastest'"),
        ({"cache_dequantized": "yes"}, TypeError, "cache_dequantized must be a bool"),
        ({"importance": [torch.ones(32)]}, TypeError, "importance must map layer names"),
        ({"importance": {0: torch.ones(32)}}, TypeError, r"layer names \(str\) to tensors"),
        ({"importance": {"lm_head": [1.0] * 32}}, TypeError, "to tensors, got 'lm_head': list"),
        ({"importance": {"lm_head": torch.ones(40)}}, ValueError, r"'lm_head'.*shape \[40\]"),
        ({"importance": {"lm_head": -torch.ones(32)}}, ValueError, r"'lm_head'.*finite and >= 0"),
        (
            {"importance": {"lm_head": torch.full((32,), float("nan"))}},
            ValueError,
            r"'lm_head'.*finite",
        ),
        ({"importance": {"lm_head": torch.ones(32, dtype=torch.int64)}}, TypeError, "float"),
        ({"quiet_patterns": 3}, TypeError, "quiet_patterns"),
    ],
)
def test_bad_keyword_arguments_are_refused_before_any_layer(monkeypatch, kwargs, error, match):
    calls = []
    real = lowbit_model.quantize
    monkeypatch.setattr(lowbit_model, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_lm()
    untouched_after(model, lambda: quant(model, S4, **kwargs), error, match)
    assert calls == []


def test_non_finite_weights_are_found_before_any_layer_is_quantized(monkeypatch):
    calls = []
    real = lowbit_model.quantize
    monkeypatch.setattr(lowbit_model, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_lm()
    with torch.no_grad():
        model.lm_head.weight[1, 2] = float("inf")
    untouched_after(model, lambda: quant(model, S4), ValueError, r"'lm_head'.*NaN or Inf")
    assert calls == []


def test_a_model_that_is_itself_a_linear_layer_is_refused():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    untouched_after(layer, lambda: quant(layer, S4), ValueError, r"from_linear\(model, spec\)")


# --- meta device -------------------------------------------------------------------------------


def test_a_meta_model_is_refused_naming_its_layers():
    with torch.device("meta"):
        model = TinyLM()
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.q'.*on the meta device.*load real"):
        quant(model, S4)
    assert dict(model.named_modules()) == modules
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_a_model_built_by_accelerate_init_empty_weights_is_refused():
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        model = TinyLM()
    with pytest.raises(ValueError, match="on the meta device"):
        quant(model, S4)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_a_partly_meta_model_is_refused_before_anything_changes():
    model = tiny_lm()
    with torch.device("meta"):
        model.blocks[1].mlp.down = nn.Linear(64, 32)
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    with pytest.raises(ValueError, match=r"layer 'blocks\.1\.mlp\.down' is on the meta device"):
        quant(model, S4)
    assert dict(model.named_modules()) == modules
    for key, value in model.state_dict().items():
        assert value.is_meta == (key not in state)
        assert value.is_meta or torch.equal(value, state[key]), key
    # Kept float, the meta layer is left alone and the rest is quantized.
    report = quant(model, S4, exclude=["blocks.1.mlp.down"])
    assert len(report.quantized) == 8 and model.blocks[1].mlp.down.weight.is_meta


def test_a_meta_bias_is_refused():
    model = mlp()
    model[2].bias = nn.Parameter(torch.empty(32, device="meta"))
    with pytest.raises(ValueError, match=r"layer '2' is on the meta device"):
        quant(model, S4)
    assert type(model[2]) is nn.Linear


# --- empty layers, Conv1D, warnings ------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_layers_are_kept_with_a_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 0), nn.Linear(0, 8), nn.Linear(16, 16))
    report = quant(model, S4)
    assert [(r.name, r.skipped) for r in report.skipped] == [
        ("0", "empty (no weights)"),
        ("1", "empty (no weights)"),
    ]
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear
    assert [r.name for r in report.quantized] == ["2"]
    assert report.avg_bits_per_weight == report.quantized[0].bits_per_weight


def test_importance_of_quantized_conv1d_layers_is_not_called_unused():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(24, 16), nn.Linear(24, 8))  # Conv1D(nf=out, nx=in)
    importance = {"0": torch.rand(16) + 0.1, "1": torch.rand(24) + 0.1, "2": torch.ones(3)}
    report = quant(model, QuantSpec(bits=4, group_size=8, fit="mse"), importance=importance)
    assert [r.name for r in report.quantized] == ["0", "1"]
    assert report.warnings == [
        "importance for '2' is unused: the model has no Linear layer of that name"
    ]


def test_quiet_patterns_do_not_warn_but_user_patterns_do():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))  # an encoder: no lm_head
    report = quant(model, S4, exclude=["lm_head"], quiet_patterns=["lm_head"])
    assert report.warnings == [] and len(report.quantized) == 2
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    report = quant(
        model, {"0": S4, "lm-head": None}, ["lm_head", "nothing.*"], quiet_patterns=["lm_head"]
    )
    assert report.warnings == [
        "pattern 'nothing.*' matched no layer",
        "pattern 'lm-head' matched no layer",
    ]


# --- progress ----------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    """tqdm's clock, advancing ``step[0]`` seconds per reading; no LOWBIT_PROGRESS override."""
    monkeypatch.delenv("LOWBIT_PROGRESS", raising=False)
    step, now = [0.0], [1000.0]

    def fake_time():
        now[0] += step[0]
        return now[0]

    monkeypatch.setattr(tqdm.std, "time", fake_time)
    return step


def use_stderr(monkeypatch, stream):
    # Inside the test: pytest's capture replaces sys.stderr again after fixtures run.
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_progress_automatic_on_a_terminal_after_two_seconds(clock, monkeypatch):
    terminal = use_stderr(monkeypatch, FakeTerminal())
    quantize_model(tiny_lm(), S4)  # the default, automatic; quick: nothing shown
    assert terminal.getvalue() == ""
    clock[0] = 0.75  # every layer "takes" over half a second: the bar appears after 2 s
    report = quantize_model(tiny_lm(), S4)  # progress=None is the default
    out = terminal.getvalue()
    assert "quantizing" in out and f"/{len(report.quantized)}" in out


def test_progress_automatic_is_silent_off_a_terminal(clock, monkeypatch):
    clock[0] = 0.75
    pipe = use_stderr(monkeypatch, io.StringIO())
    quantize_model(tiny_lm(), S4)
    assert pipe.getvalue() == ""


def test_progress_true_and_false(clock, monkeypatch):
    clock[0] = 0.75
    terminal = use_stderr(monkeypatch, FakeTerminal())
    quant(tiny_lm(), S4, progress=False)
    assert terminal.getvalue() == ""
    pipe = use_stderr(monkeypatch, io.StringIO())
    quant(tiny_lm(), S4, progress=True)
    assert "quantizing" in pipe.getvalue()


# --- several candidate specs -------------------------------------------------------------------

ASYM = QuantSpec(bits=4, group_size=32)  # 4 + 16/32 + 4/32 = 4.625 bits/weight
SYM = QuantSpec(bits=4, group_size=32, symmetric=True)  # 4 + 16/32 = 4.5 bits/weight


def candidate_figures(weight, specs, importance=None, fit_importance=None):
    """(spec, bits/weight, error) of each candidate, measured independently of quantize_model:
    fitted with ``fit_importance``, the error weighted by ``importance``."""
    rows = []
    for spec in specs:
        qt = quantize(weight, spec, importance=fit_importance)
        restored = qt.dequantize().double()
        w = weight.double()
        imp = torch.ones_like(w) if importance is None else importance.double().expand_as(w)
        err = ((imp * (w - restored) ** 2).sum() / (imp * w**2).sum()).sqrt().item()
        rows.append((spec, qt.bits_per_weight, err))
    return rows


def uniform_model():
    # Uniform weights: the zero point of ASYM buys ~5-8% less error, less than its extra
    # 0.125 bits/weight are worth (8.3%), so the two rules disagree.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(64, 16, bias=False))
    with torch.no_grad():
        for layer in model:
            layer.weight.uniform_(-1, 1)
    return model


def test_choose_error_keeps_the_most_accurate_and_says_sizes_differ():
    model = uniform_model()
    weights = [layer.weight.detach().clone() for layer in model]
    report = quant(model, {"*": [SYM, ASYM]})
    for weight, row in zip(weights, report.quantized, strict=True):
        figures = candidate_figures(weight, [SYM, ASYM])
        best = min(figures, key=lambda f: f[2])
        assert best[0] is ASYM and best[1] == 4.625  # the larger one
        assert model.get_submodule(row.name).spec == ASYM and row.spec == ASYM.label
        assert "smallest error of 2; candidates differ in size" in row.choice
        assert [c["spec"] for c in row.candidates] == [SYM.label, ASYM.label]
        assert [c["bits_per_weight"] for c in row.candidates] == [4.5, 4.625]
        for cand, (_, _, err) in zip(row.candidates, figures, strict=True):
            assert cand["rel_error"] == pytest.approx(err, rel=1e-4)
    assert report.warnings == [
        "candidate specs differ in stored size on 2 layers (4.500-4.625 bits/weight); 2 of them "
        "kept a larger candidate than the smallest. choose='error' keeps the most accurate "
        "whatever it costs; choose='size_adjusted' compares them at equal size (each bit halves "
        "the error)"
    ]
    table = report.table()
    assert f"{ASYM.label}*" in table and "candidate specs of different sizes" in table
    assert json.loads(report.to_json())["layers"][0]["candidates"][1]["bits_per_weight"] == 4.625


def test_choose_size_adjusted_compares_at_equal_size():
    model = uniform_model()
    weights = [layer.weight.detach().clone() for layer in model]
    report = quant(model, {"*": [ASYM, SYM]}, choose="size_adjusted")
    for weight, row in zip(weights, report.quantized, strict=True):
        figures = candidate_figures(weight, [ASYM, SYM])
        best = min(figures, key=lambda f: f[2] * 2 ** f[1])
        assert best[0] is SYM
        assert model.get_submodule(row.name).spec == SYM
        assert row.rel_error == pytest.approx(figures[1][2], rel=1e-4)  # its own error
        assert "size-adjusted" in row.choice
    assert report.avg_bits_per_weight == 4.5
    assert "0 of them kept a larger candidate" in report.warnings[0]


def test_size_adjusted_still_pays_for_bits_that_are_worth_it():
    # Gaussian weights: the zero point buys ~20% less error, more than 0.125 bits are worth.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        model[0].weight.normal_()
    weight = model[0].weight.detach().clone()
    report = quant(model, {"*": [SYM, ASYM]}, choose="size_adjusted")
    figures = candidate_figures(weight, [SYM, ASYM])
    assert min(figures, key=lambda f: f[2] * 2 ** f[1])[0] is ASYM
    assert report.quantized[0].spec == ASYM.label


def test_equal_size_candidates_need_no_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    report = quant(model, {"*": [SYM, QuantSpec(bits=4, group_size=32, symmetric=True, fit="mse")]})
    assert report.warnings == [] and "differ in size" not in report.quantized[0].choice
    assert "*" not in report.table().split("\n")[2]


def test_candidates_are_compared_by_importance_weighted_error():
    # Small weights in the first half of each row, large ones in the second; only the first
    # half matters. The importance-aware mse fit clips the unimportant large weights: it wins
    # on the weighted error and loses on the plain one to min/max (which ignores importance).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16, bias=False))
    with torch.no_grad():
        model[0].weight.normal_(0, 0.05)
        model[0].weight[:, 32:] *= 20
    weight = model[0].weight.detach().clone()
    importance = torch.cat([torch.ones(32), torch.full((32,), 1e-4)])
    plain = QuantSpec(bits=4)
    searched = QuantSpec(bits=4, fit="mse")
    report = quant(model, {"*": [plain, searched]}, importance={"0": importance})
    both = [plain, searched]
    weighted = candidate_figures(weight, both, importance, fit_importance=importance)
    unweighted = candidate_figures(weight, both, fit_importance=importance)
    assert min(unweighted, key=lambda f: f[2])[0] is plain
    assert min(weighted, key=lambda f: f[2])[0] is searched
    assert model[0].spec == searched
    row = report.quantized[0]
    assert "smallest importance-weighted error of 2" in row.choice
    assert row.candidates[1]["weighted_error"] == pytest.approx(weighted[1][2], rel=1e-4)
    assert row.rel_error == pytest.approx(unweighted[1][2], rel=1e-4)


# --- helpers -----------------------------------------------------------------------------------


def test_weight_error_checks_shapes_and_weighs():
    with pytest.raises(ValueError, match=r"restored has shape \[1\], weight \[3\]"):
        weight_error(torch.ones(3), torch.ones(1))
    with pytest.raises(TypeError, match="restored must be a tensor"):
        weight_error(torch.ones(3), [1.0, 1.0, 1.0])
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    restored = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    rel, _ = weight_error(w, restored, importance=torch.tensor([1.0, 0.0]))
    assert rel == 0.0  # the only difference is in a column of weight 0
    rel, sqnr = weight_error(w, restored, importance=torch.tensor([0.0, 1.0]))
    assert rel == pytest.approx(1 / math.sqrt(17)) and sqnr == pytest.approx(-20 * math.log10(rel))
    with pytest.raises(ValueError, match="importance has shape"):
        weight_error(w, restored, importance=torch.ones(3))


def test_report_checks_max_rows_and_serialises_warnings(quantized_lm):
    _, report, _, _, _ = quantized_lm
    with pytest.raises(ValueError, match="max_rows"):
        report.table(max_rows=-1)
    report.warnings = ["something"]
    report.bytes_after = 0
    data = json.loads(report.to_json())
    assert data["warnings"] == ["something"]
    report.seconds = float("inf")
    assert json.loads(report.to_json())["totals"]["seconds"] is None  # strict JSON


def test_set_submodule_refuses_the_root():
    with pytest.raises(ValueError, match="model itself"):
        lowbit_model.set_submodule(mlp(), "", nn.ReLU())


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, group_size=32),
        QuantSpec(bits=8, symmetric=True),
        QuantSpec(bits=4, grid="nf4", group_size=32),
        QuantSpec(bits=4, group_size=48),  # partial groups: no PyTorch kernel takes them
    ],
    ids=lambda v: v.label,
)
def test_the_report_names_the_paths_each_layer_runs(spec):
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    report = quantize_model(model, spec, progress=False)
    plans = [model[i].plan().summary() for i in (0, 2)]
    assert [row.kernel for row in report.quantized] == plans
    assert report.to_dict()["layers"][0]["kernel"] == plans[0]
    assert f"  {plans[0]}" in report.table()
    # float32 weights: lowbit's float32-exact kernel for small batches, then dequantize.
    exact = {"cpu_native", "cpu_native_tiled", "dequantize"}
    for plan in plans:
        assert plan.startswith("cpu_native:1-")
        assert {part.split(":")[0] for part in plan.split(",")} <= exact
