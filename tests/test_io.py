"""`lowbit.save` / `lowbit.load` and the Hugging Face wrappers: bit-exact, atomic, strict."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lowbit
from lowbit import QuantLinear, QuantSpec, quantize_model
from lowbit.io import FORMAT_VERSION, read_manifest

SPECS = {
    "a": QuantSpec(bits=8, symmetric=True),
    "b": QuantSpec(bits=4, group_size=32),
    "c": QuantSpec(bits=4, group_size=32, symmetric=True, scale_dtype="bfloat16"),
    "d": QuantSpec(bits=3, group_size=16),
    "e": QuantSpec(bits=2, granularity="tensor", scale_dtype="float32"),
}
LINEARS = ("a", "b", "c", "d", "e", "f")


class Mixed(nn.Module):
    """Embedding tied to a float head, Linear layers of three dtypes, a LayerNorm."""

    def __init__(self, vocab: int = 40, wide: int = 96, extra: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 64)
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, wide)
        self.c = nn.Linear(wide, 64, dtype=torch.float16)
        self.d = nn.Linear(64, 64, bias=False, dtype=torch.bfloat16)
        self.e = nn.Linear(64, 64)
        self.f = nn.Linear(64, 64, dtype=torch.float16)  # matched by no rule: stays float
        if extra:
            self.g = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for name in LINEARS:
            layer = getattr(self, name)
            dtype = layer.weight_dtype if isinstance(layer, QuantLinear) else layer.weight.dtype
            x = torch.tanh(layer(x.to(dtype)).float())
        return self.head(self.norm(x))


def quantized_mixed(**kwargs) -> Mixed:
    model = Mixed(**kwargs).eval()
    report = quantize_model(model, dict(SPECS), exclude=["head"], progress=False)
    assert [r.name for r in report.quantized] == list(SPECS)
    return model


@pytest.fixture
def model():
    return quantized_mixed()


@pytest.fixture
def saved(model, tmp_path):
    return lowbit.save(model, tmp_path / "ckpt", metadata={"note": "mixed"})


IDS = torch.arange(24).view(2, 12)


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS)


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert sa[key].device == sb[key].device, key
        assert torch.equal(sa[key], sb[key]), key
    for name in SPECS:
        la, lb = a.get_submodule(name), b.get_submodule(name)
        assert isinstance(lb, QuantLinear)
        assert lb.spec == la.spec == SPECS[name]
        assert lb.weight_dtype == la.weight_dtype
        assert (lb.zero is None) == SPECS[name].symmetric
    assert type(b.f) is nn.Linear and b.f.weight.dtype == torch.float16
    assert torch.equal(outputs(a), outputs(b))


def assert_tied(model: Mixed) -> None:
    assert model.head.weight is model.emb.weight
    assert model.head.weight.data_ptr() == model.emb.weight.data_ptr()


def test_round_trip_is_bit_exact(model, saved):
    assert sorted(os.listdir(saved)) == ["lowbit.json", "model.safetensors"]
    loaded = lowbit.load(saved, Mixed())
    assert_same_model(model, loaded)
    assert_tied(loaded)
    assert loaded.b.scale.dtype == torch.float16 and loaded.c.scale.dtype == torch.bfloat16
    assert loaded.e.scale.dtype == torch.float32 and loaded.e.scale.shape == (1, 1)
    assert loaded.d.dequantize_weight().dtype == torch.bfloat16


@pytest.mark.parametrize("how", ["torch.device", "init_empty_weights"])
def test_load_into_meta_skeleton(model, saved, how):
    if how == "torch.device":
        with torch.device("meta"):
            skeleton = Mixed()
    else:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            skeleton = Mixed()
    assert skeleton.a.weight.is_meta and skeleton.emb.weight.is_meta
    loaded = lowbit.load(saved, skeleton)
    assert loaded is skeleton
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert_same_model(model, loaded)
    assert_tied(loaded)


def test_tied_weights_are_stored_once_and_stay_tied(model, saved):
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "emb.weight" in keys and "head.weight" not in keys
    assert read_manifest(saved)["aliases"] == {"head.weight": "emb.weight"}
    loaded = lowbit.load(saved, Mixed())
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    loaded.to(torch.float64)  # a dtype change keeps them one tensor, as before saving
    assert_tied(loaded)
    assert loaded.emb.weight.dtype == torch.float64


def test_manifest_is_json_with_version_and_specs(model, saved):
    manifest = json.loads((saved / "lowbit.json").read_text())
    assert manifest == read_manifest(saved)
    assert manifest["format"] == "lowbit"
    assert manifest["format_version"] == FORMAT_VERSION == 1
    assert manifest["metadata"] == {"note": "mixed"}
    assert (
        manifest["sha256"] == hashlib.sha256((saved / "model.safetensors").read_bytes()).hexdigest()
    )
    assert set(manifest["layers"]) == set(SPECS)
    dtypes = {"a": "float32", "b": "float32", "c": "float16", "d": "bfloat16", "e": "float32"}
    for name, info in manifest["layers"].items():
        assert QuantSpec.from_dict(info["spec"]) == SPECS[name]
        assert info["dtype"] == dtypes[name]
        layer = model.get_submodule(name)
        assert (info["in_features"], info["out_features"]) == (
            layer.in_features,
            layer.out_features,
        )
        assert info["bias"] == (name != "d")


def test_unquantized_model_round_trips(tmp_path):
    model = Mixed()
    loaded = lowbit.load(lowbit.save(model, tmp_path / "fp"), Mixed())
    assert read_manifest(tmp_path / "fp")["layers"] == {}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert_tied(loaded)


class Views(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("wt", self.w.data.t())  # same storage, offset and shape as w
        self.register_buffer("row", self.w.data[1])  # a slice of w's storage


def test_views_sharing_storage_round_trip(tmp_path):
    model = Views()
    loaded = lowbit.load(lowbit.save(model, tmp_path / "views"), Views())
    assert torch.equal(loaded.wt, model.w.t())
    assert torch.equal(loaded.row, model.w[1])
    assert torch.equal(loaded.w, model.w)


# Atomicity


def test_failed_save_leaves_nothing(model, tmp_path):
    def fail(directory):
        (directory / "partial.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        lowbit.save(model, tmp_path / "out", write_extra=fail)
    assert os.listdir(tmp_path) == []


def test_interrupted_save_leaves_nothing(model, tmp_path):
    def interrupt(directory):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lowbit.save(model, tmp_path / "out", write_extra=interrupt)
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_directory(model, saved):
    before = {p: (saved / p).read_bytes() for p in os.listdir(saved)}

    def fail(directory):
        raise OSError("boom")

    with pytest.raises(OSError, match="boom"):
        lowbit.save(quantized_mixed(), saved, write_extra=fail)
    assert os.listdir(saved.parent) == [saved.name]
    assert {p: (saved / p).read_bytes() for p in os.listdir(saved)} == before
    assert_same_model(model, lowbit.load(saved, Mixed()))


def test_overwrite_replaces_and_cleans_up(saved):
    other = Mixed()
    quantize_model(other, QuantSpec(bits=8), exclude=["head"], progress=False)
    lowbit.save(other, saved, write_extra=lambda d: (d / "extra.txt").write_text("hi"))
    assert os.listdir(saved.parent) == [saved.name]
    assert (saved / "extra.txt").read_text() == "hi"
    assert {info["spec"]["bits"] for info in read_manifest(saved)["layers"].values()} == {8}
    assert torch.equal(outputs(other), outputs(lowbit.load(saved, Mixed())))


def test_overwrite_false_refuses(model, saved):
    before = (saved / "lowbit.json").read_bytes()
    with pytest.raises(FileExistsError, match="ckpt"):
        lowbit.save(model, saved, overwrite=False)
    assert (saved / "lowbit.json").read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def test_save_onto_a_file_is_an_error(model, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep")
    with pytest.raises(ValueError, match="not a directory"):
        lowbit.save(model, target)
    assert target.read_text() == "keep" and os.listdir(tmp_path) == ["file"]


# Bad input


def test_missing_manifest(saved):
    (saved / "lowbit.json").unlink()
    with pytest.raises(FileNotFoundError, match="lowbit.json"):
        lowbit.load(saved, Mixed())


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="lowbit.json"):
        lowbit.load(tmp_path / "nowhere", Mixed())


def test_missing_tensors_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        lowbit.load(saved, Mixed())


@pytest.mark.parametrize("keep", [0, 5, 100, -1])
def test_truncated_tensors_file(saved, keep):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) - 7])
    with pytest.raises(ValueError, match=r"model\.safetensors.*corrupted"):
        lowbit.load(saved, Mixed())
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors"):
        lowbit.load(saved, Mixed(), verify=False)


def test_flipped_byte_is_corruption(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors.*corrupted"):
        lowbit.load(saved, Mixed())


def test_broken_header_without_verify(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    assert data[8:9] == b"{"
    data[8] = ord("X")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors"):
        lowbit.load(saved, Mixed(), verify=False)


def edit_manifest(directory, **changes) -> None:
    path = directory / "lowbit.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_invalid_json_manifest(saved):
    (saved / "lowbit.json").write_text('{"format": "lowbit", ')
    with pytest.raises(ValueError, match=r"lowbit\.json.*not valid JSON"):
        lowbit.load(saved, Mixed())
    (saved / "lowbit.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"lowbit\.json"):
        lowbit.load(saved, Mixed())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": 2}, "format_version 2; this lowbit reads 1"),
        ({"format_version": "1"}, "format_version '1'"),
        ({"format": "gguf"}, "not a lowbit manifest"),
    ],
)
def test_bad_manifest_entries(saved, changes, message):
    edit_manifest(saved, **changes)
    with pytest.raises(ValueError, match=message):
        lowbit.load(saved, Mixed())


@pytest.mark.parametrize("key", ["tensors_file", "sha256", "layers", "aliases"])
def test_manifest_missing_an_entry(saved, key):
    manifest = json.loads((saved / "lowbit.json").read_text())
    del manifest[key]
    (saved / "lowbit.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"lacks the '{key}' entry"):
        lowbit.load(saved, Mixed())


def test_manifest_that_is_not_an_object(saved):
    (saved / "lowbit.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a lowbit manifest"):
        read_manifest(saved)


def test_alias_to_a_missing_tensor(saved):
    edit_manifest(saved, aliases={"head.weight": "nope.weight"})
    with pytest.raises(ValueError, match="nope.weight"):
        lowbit.load(saved, Mixed())


def test_layer_missing_from_the_model(saved):
    skeleton = Mixed()
    del skeleton.e
    with pytest.raises(ValueError, match="layer 'e'.*does not exist"):
        lowbit.load(saved, skeleton)


def test_layer_of_another_type(saved):
    skeleton = Mixed()
    skeleton.e = nn.Identity()
    with pytest.raises(ValueError, match="layer 'e' is a Identity"):
        lowbit.load(saved, skeleton)


def test_layer_of_another_shape(saved):
    with pytest.raises(ValueError, match=r"layer 'b'.*\[96, 64\].*\[80, 64\]"):
        lowbit.load(saved, Mixed(wide=80))


def test_float_tensor_of_another_shape(saved):
    with pytest.raises(ValueError, match="emb.weight"):
        lowbit.load(saved, Mixed(vocab=41))


def test_model_with_an_extra_layer(saved):
    with pytest.raises(ValueError, match=r"missing tensors \['g.bias', 'g.weight'\]"):
        lowbit.load(saved, Mixed(extra=True))


def test_saved_extra_tensor_is_unexpected(tmp_path):
    path = lowbit.save(quantized_mixed(extra=True), tmp_path / "extra")
    skeleton = Mixed()
    skeleton.g = nn.Linear(64, 64)  # an nn.Linear the manifest names...
    del skeleton.f  # ...while a float tensor the file holds has nowhere to go
    with pytest.raises(ValueError, match="unexpected tensors.*f.weight"):
        lowbit.load(path, skeleton)


@pytest.mark.parametrize("bad", ["model", None, {"a": torch.zeros(1)}, nn.Linear])
def test_non_module_arguments(saved, tmp_path, bad):
    with pytest.raises(TypeError, match="nn.Module"):
        lowbit.load(saved, bad)
    with pytest.raises(TypeError, match="nn.Module"):
        lowbit.save(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_load_unpickles_nothing(model, saved, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert_same_model(model, lowbit.load(saved, Mixed()))


# Hugging Face wrappers


@pytest.fixture(scope="module")
def tiny_quantized(tiny_llama_dir, tmp_path_factory):
    from lowbit.io.hf import load_pretrained, save_quantized

    model, tokenizer = load_pretrained(tiny_llama_dir)
    quantize_model(
        model,
        {"*.mlp.*": QuantSpec(bits=4, group_size=32), "*": QuantSpec(bits=8)},
        exclude=["lm_head"],
        progress=False,
    )
    out = save_quantized(model, tokenizer, tmp_path_factory.mktemp("hf") / "q", {"k": "v"})
    return model, out


def test_hf_round_trip_gives_identical_logits(tiny_quantized, monkeypatch):
    from lowbit.io.hf import load_quantized

    model, out = tiny_quantized
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "lowbit.json"):
        assert (out / name).is_file(), name
    assert read_manifest(out)["metadata"] == {"k": "v"}
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded, tokenizer = load_quantized(out)
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    specs = {n: m.spec.label for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert len(specs) == 14
    assert specs["model.layers.1.mlp.up_proj"] == "int4 g32 asym"
    assert specs["model.layers.0.self_attn.q_proj"] == "int8 channel asym"
    ids = tokenizer(" = Robert Boulter = ", return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 20  # the character-level tokenizer came back
    with torch.inference_mode():
        a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_hf_load_into_plain_meta_skeleton_is_refused(tiny_quantized):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, out = tiny_quantized
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    # Rotary inv_freq is a non-persistent buffer: never saved, so it would stay on meta.
    with pytest.raises(ValueError, match="inv_freq.*meta"):
        lowbit.load(out, skeleton)


def test_load_quantized_needs_a_manifest(tiny_llama_dir):
    from lowbit.io.hf import load_quantized

    with pytest.raises(FileNotFoundError, match="lowbit.json"):
        load_quantized(tiny_llama_dir)


@pytest.mark.parametrize("skeleton", [lambda: Mixed(vocab=41), lambda: Mixed(extra=True)])
def test_failed_load_leaves_the_skeleton_untouched(saved, skeleton):
    fresh = skeleton()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit"):
        lowbit.load(saved, fresh)
    assert not any(isinstance(m, QuantLinear) for m in fresh.modules())
    after = fresh.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_failed_save_into_new_nested_folders_leaves_no_folders(model, tmp_path):
    def boom(_tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        lowbit.save(model, tmp_path / "a" / "b" / "ckpt", write_extra=boom)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_replace_a_directory_it_did_not_write(model, tmp_path):
    victim = tmp_path / "source-model"
    victim.mkdir()
    (victim / "NOTES.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a lowbit checkpoint"):
        lowbit.save(model, victim)
    assert (victim / "NOTES.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    lowbit.save(model, empty)
    assert (empty / "lowbit.json").is_file()
    assert oct(empty.stat().st_mode & 0o777) != oct(0o700)  # readable like any folder


def test_a_layer_shared_under_two_names_round_trips(tmp_path):
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    quantize_model(model, QuantSpec(bits=4, group_size=32), progress=False)
    assert model[0] is model[2]
    lowbit.save(model, tmp_path / "m")
    other = nn.Linear(32, 32)
    fresh = lowbit.load(tmp_path / "m", nn.Sequential(other, nn.Tanh(), other))
    assert fresh[0] is fresh[2] and isinstance(fresh[0], QuantLinear)
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), model(x))


def test_quantized_tensors_of_another_dtype_are_refused(model, saved):
    from safetensors.torch import load_file, save_file

    path = saved / "model.safetensors"
    state = load_file(str(path))
    state["b.scale"] = state["b.scale"].to(torch.float32)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"b\.scale is torch\.float32, expected torch\.float16"):
        lowbit.load(saved, Mixed(), verify=False)


def test_gpt2_conv1d_layers_quantize_save_and_load(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowbit.io.hf import is_causal_lm

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    assert is_causal_lm(config) or is_causal_lm(GPT2LMHeadModel(config).config)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (1, 12))
    with torch.inference_mode():
        reference = model(ids).logits
    report = quantize_model(model, QuantSpec(bits=8), progress=False)
    assert len(report.quantized) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert [r.skipped for r in report.skipped] == ["tied to transformer.wte"]
    with torch.inference_mode():
        quantized = model(ids).logits
    assert ((quantized - reference).norm() / reference.norm()) < 0.02
    lowbit.save(model, tmp_path / "g")
    fresh = lowbit.load(tmp_path / "g", GPT2LMHeadModel(config).eval())
    with torch.inference_mode():
        assert torch.equal(fresh(ids).logits, quantized)
