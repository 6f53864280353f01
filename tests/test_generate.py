"""`lowbit generate` and `lowbit.generate.generate` on the tiny Llama checkpoint."""

from __future__ import annotations

import pytest
import torch

from lowbit.cli import main
from lowbit.generate import Generation, generate
from lowbit.io.hf import load_pretrained, load_quantized


@pytest.fixture(scope="module")
def int8_dir(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "int8"
    argv = ["quantize", "--model", str(tiny_llama_dir), "--bits", "8", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_generate_is_greedy_and_counts_its_tokens(tiny_llama_dir):
    model, tokenizer = load_pretrained(tiny_llama_dir, torch.float32, tokenizer=True)
    result = generate(model, tokenizer, "hello world", max_new_tokens=12)
    assert isinstance(result, Generation)
    assert result.prompt_tokens == len("hello world")  # one token per character here
    assert 1 <= result.new_tokens <= 12
    assert result.prefill_s > 0 and result.decode_s >= 0
    # Greedy: the same text every time, and the argmax continuation step by step.
    again = generate(model, tokenizer, "hello world", max_new_tokens=12)
    assert again.text == result.text
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    with torch.inference_mode():
        first = model(ids).logits[0, -1].argmax()
    assert result.text.startswith(tokenizer.decode([int(first)]))


def test_a_quantized_directory_generates_like_its_layers_compute(int8_dir):
    model, tokenizer = load_quantized(int8_dir)
    result = generate(model, tokenizer, "abc", max_new_tokens=5)
    ids = tokenizer("abc", return_tensors="pt").input_ids
    with torch.inference_mode():
        first = model(ids).logits[0, -1].argmax()
    assert result.text.startswith(tokenizer.decode([int(first)]))


def test_cli_generate_prints_text_and_speeds(int8_dir, tiny_llama_dir, capsys):
    assert main(["generate", str(int8_dir), "--prompt", "abc", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"model: {int8_dir}" in out
    assert "prefill: 3 tokens in" in out and "tok/s" in out and "decode: " in out
    argv = ["generate", "--model", str(tiny_llama_dir), "--dtype", "bfloat16", "--prompt", "abc"]
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    assert "(bfloat16)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be in 1..65536"),
        (["--max-new-tokens", "1000"], "exceed the model's context of 256 tokens"),
        (["--dtype", "bfloat16"], "--dtype applies to --model"),
        (["--model", "x"], "not both"),
    ],
)
def test_cli_generate_bad_arguments(int8_dir, capsys, extra, message):
    assert main(["generate", str(int8_dir), "--prompt", "abc", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_generate_refuses_a_directory_that_is_not_a_quantized_lm(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "abc"]) == 2
    assert "lowbit manifest" in capsys.readouterr().err
    assert main(["generate", "--prompt", " "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


def test_generate_checks_its_arguments(tiny_llama_dir):
    model, tokenizer = load_pretrained(tiny_llama_dir, torch.float32, tokenizer=True)
    with pytest.raises(TypeError, match="prompt must be a str"):
        generate(model, tokenizer, 3)
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        generate(model, tokenizer, "a", max_new_tokens=2.0)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, tokenizer, "  ")
    with pytest.raises(TypeError, match="cannot generate"):
        generate(torch.nn.Linear(2, 2), tokenizer, "a")


def test_compiled_decoding_gives_the_same_text_and_reports_the_compilation(int8_dir):
    """The static-cache, compiled decode step (lowbit's native kernels traced through their
    fake kernels) continues exactly as the eager one."""
    model, tokenizer = load_quantized(int8_dir)
    eager = generate(model, tokenizer, "abc", max_new_tokens=6)
    compiled = generate(model, tokenizer, "abc", max_new_tokens=6, compile=True)
    assert compiled.text == eager.text and compiled.new_tokens == eager.new_tokens
    assert compiled.compile_s > 0 and compiled.decode_steps == compiled.new_tokens - 2
    assert "compile + first decode step" in compiled.summary()
    with pytest.raises(TypeError, match="compile must be a bool"):
        generate(model, tokenizer, "abc", max_new_tokens=2, compile="yes")
