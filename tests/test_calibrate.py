"""Calibration: activation importance per input feature, and its use by quantize_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit import QuantSpec, quantize_model
from lowbit.calibrate import calibration_batches, input_importance, shakespeare_text


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_importance_is_the_mean_squared_input():
    model = TwoLayer()
    batches = [torch.randn(4, 16) for _ in range(3)]
    imp = input_importance(model, batches)
    x = torch.cat(batches)
    expected = (x * x).mean(0)
    assert torch.allclose(imp["a"], expected / expected.mean(), rtol=1e-5)
    hidden = torch.relu(model.a(x))
    expected_b = (hidden * hidden).mean(0)
    assert torch.allclose(imp["b"], expected_b / expected_b.mean(), rtol=1e-4)
    assert set(input_importance(model, batches, layers=["b"])) == {"b"}
    assert not model.a._forward_pre_hooks  # hooks removed


def test_importance_lowers_the_weighted_output_error():
    torch.manual_seed(0)
    model = TwoLayer()
    scales = torch.logspace(-2, 1, 16)  # features of very different size
    batches = [torch.randn(64, 16) * scales for _ in range(4)]
    imp = input_importance(model, batches, layers=["a"])
    x = torch.cat(batches)
    reference = model.a(x)
    errors = {}
    for weighted in (False, True):
        m = TwoLayer()
        m.load_state_dict(model.state_dict())
        quantize_model(
            m,
            {"a": QuantSpec(bits=2, group_size=8, fit="mse")},
            progress=False,
            importance=imp if weighted else None,
        )
        errors[weighted] = (m.a(x) - reference).pow(2).mean().item()
    assert errors[True] < errors[False]


def test_bad_calibration_input():
    with pytest.raises(ValueError, match="empty"):
        input_importance(TwoLayer(), [])
    with pytest.raises(ValueError, match="NaN or Inf"):
        input_importance(TwoLayer(), [torch.full((2, 16), float("nan"))])
    with pytest.raises(TypeError, match="importance"):
        quantize_model(TwoLayer(), QuantSpec(bits=4, fit="mse"), importance={"a": [1.0]})


def test_unused_importance_warns_and_rotation_ignores_it():
    model = TwoLayer()
    imp = {"a": torch.ones(16), "b": torch.ones(32), "c": torch.ones(3)}
    report = quantize_model(
        model,
        {"a": QuantSpec(bits=4, group_size=16, fit="mse", rotation="hadamard")},
        progress=False,
        importance=imp,
    )
    assert any("'c'" in w and "unused" in w for w in report.warnings)
    assert not any("'b'" in w for w in report.warnings)  # kept float by the rules: expected
    assert any("importance is not used with rotation" in w for w in report.warnings)


def test_shakespeare_batches():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    batches = calibration_batches(fast, windows=3, seq_len=20)
    assert len(batches) == 3 and batches[0]["input_ids"].shape == (1, 20)
    assert shakespeare_text().startswith("First Citizen")
    with pytest.raises(ValueError, match="windows"):
        calibration_batches(fast, windows=0)
