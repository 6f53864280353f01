"""quantize_model on small real models: rules, exclusions, tied weights, errors, the Report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

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
    return quantize_model(model, rules, *args, progress=False, **kwargs)


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


def test_quantized_layers_are_not_quantized_again():
    model = mlp()
    quant(model, S8)
    layers = [model[i] for i in (0, 2, 4)]
    report = quant(model, S2)
    assert report.layers == []
    assert [model[i] for i in (0, 2, 4)] == layers


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


def test_bits_out_of_range_names_bits_and_the_layer():
    model = tiny_lm()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'lm_head'.*bits=1"):
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
