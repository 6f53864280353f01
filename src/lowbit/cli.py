"""The ``lowbit`` command: ``quantize`` and ``eval``, thin over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowbit.spec import GRANULARITIES, SCALE_DTYPES, QuantSpec

DEFAULT_EXCLUDE = ["lm_head"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lowbit`` command (subcommands quantize and eval)."""
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model's Linear layers, print the report, save")
    q.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model directory (default: SmolLM2-135M-Instruct)",
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
        "codebook of that width per layer and keep the smallest error. Codebooks imply "
        "--symmetric.",
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
    q.add_argument("--scale-dtype", choices=SCALE_DTYPES, default="float16")
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
    q.add_argument("--out", default=None, help="directory to save the quantized model to")
    q.add_argument("--table", action="store_true", help="print every layer, not only the worst")
    q.add_argument("--json", default=None, help="write the report as JSON to this file")

    e = sub.add_parser("eval", help="WikiText-2 perplexity and size: full precision vs quantized")
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
    e.add_argument("--json", default=None, help="write the results as JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run ``lowbit`` with ``argv``; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "quantize":
            return cmd_quantize(args)
        return cmd_eval(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"lowbit {args.command}: error: {err}", file=sys.stderr)
        return 2


def cmd_quantize(args) -> int:
    """``lowbit quantize``: load, quantize, print the report, save with ``--out``."""
    from lowbit.io.hf import load_pretrained, save_quantized
    from lowbit.model import quantize_model
    from lowbit.models import resolve_model

    specs = cli_specs(args)
    spec = specs[0]
    if args.calibrate < 0:
        raise ValueError(f"--calibrate must be >= 0, got {args.calibrate}")
    if args.calibrate and spec.fit in ("minmax", "absmax", "percentile"):
        raise ValueError(
            f"--calibrate needs a searching fit (--fit mse, hqq or entropy); {spec.fit!r} "
            "does not use importance"
        )
    exclude = DEFAULT_EXCLUDE if args.exclude is None else args.exclude
    source = resolve_model(args.model)
    label = (
        spec.label if len(specs) == 1 else "best per layer of " + ", ".join(s.label for s in specs)
    )
    print(
        f"model: {source}\nspec: {label} (scales {spec.scale_dtype}); "
        f"kept float: {exclude or 'none'}"
    )
    if args.out:
        out = Path(args.out).resolve()
        if out == source.resolve() or source.resolve() in out.parents:
            raise ValueError(f"--out {args.out!r} is the source model's directory or inside it")
        if out.exists() and not (
            out.is_dir() and (not any(out.iterdir()) or (out / "lowbit.json").is_file())
        ):
            raise FileExistsError(f"--out {args.out!r} exists and is not a lowbit checkpoint")
    model, tokenizer = load_pretrained(source)
    rules = {"*": specs} if len(specs) > 1 else spec
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
    )
    print(report.table(None if args.table else 8))
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not report.quantized:
        raise ValueError(
            f"no layer of {source} was quantized: it has no nn.Linear layers that the rules "
            "select (see the table: layers kept and why)"
        )
    if args.json:
        Path(args.json).write_text(report.to_json())
    if args.out:
        metadata = {
            "source_model": str(source),
            "specs": [s.to_dict() for s in specs],
            "exclude": exclude,
            "report": report.to_dict()["totals"],
        }
        save_quantized(model, tokenizer, args.out, metadata)
        print(f"saved to {args.out}")
    return 0


def cli_specs(args) -> list[QuantSpec]:
    """The spec(s) the quantize options ask for: one, or the candidates of ``--grid best``.

    Every spec is checked against its grid here, before any model is loaded.
    """
    import torch

    from lowbit.fit import fit_options
    from lowbit.grids import CodebookGrid, available_grids, get_grid
    from lowbit.quantize import quantize

    options = parse_fit_options(args.fit_option)

    def make(grid: str, symmetric: bool) -> QuantSpec:
        spec = QuantSpec(
            bits=args.bits,
            group_size=args.group_size,
            granularity=args.granularity,
            symmetric=symmetric,
            grid=grid,
            scale_dtype=args.scale_dtype,
            zero_point=args.zero_point,
            rotation="hadamard" if args.rotate else None,
            fit=args.fit,
            fit_options=options or None,
        )
        get_grid(grid).check_spec(spec)
        fit_options(spec)  # unknown fit or option: fail before loading the model
        # Option values out of range too: one tiny block runs every check of the fit.
        quantize(torch.linspace(-1.0, 1.0, spec.group_size or 8)[None], spec, name="--fit-option")
        return spec

    float_zero = args.zero_point == "float"

    def make_codebook(name: str) -> QuantSpec:
        # Codebooks take symmetric specs, or a float zero point (one-sided ones always).
        if args.symmetric or (not float_zero and get_grid(name).two_sided(args.bits)):
            return make(name, True)
        args_zero, args.zero_point = args.zero_point, "float"
        try:
            return make(name, False)
        finally:
            args.zero_point = args_zero

    if args.grid != "best":
        if isinstance(get_grid(args.grid), CodebookGrid):
            get_grid(args.grid).check_bits(args.bits)
            return [make_codebook(args.grid)]
        return [make(args.grid, args.symmetric)]
    specs = [make("int", args.symmetric)]
    for name in available_grids():
        grid = get_grid(name)
        if isinstance(grid, CodebookGrid) and grid.min_bits <= args.bits <= grid.max_bits:
            specs.append(make_codebook(name))
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
    """``lowbit eval``: perplexity and size of the baseline and each saved directory."""
    from lowbit.eval import eval_tokens, perplexity
    from lowbit.io import read_manifest
    from lowbit.io.hf import is_causal_lm, load_pretrained, load_quantized
    from lowbit.model import model_bytes
    from lowbit.models import resolve_model

    manifests = [read_manifest(d) for d in args.quantized]
    base = args.model
    if base is None and manifests:
        base = manifests[0].get("metadata", {}).get("source_model")
    source = resolve_model(base)
    model, tokenizer = load_pretrained(source)
    if not is_causal_lm(model.config):
        raise ValueError(f"{source}: perplexity needs a causal language model")
    tokens = eval_tokens(tokenizer, args.seq_len, args.windows)
    print(
        f"WikiText-2 test, first {tokens.numel()} tokens: {args.windows} windows x {args.seq_len}"
    )
    rows = []
    base_bytes = model_bytes(model)
    fp = perplexity(model, tokens)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    rows.append(
        {
            "model": f"{dtype} {source.name}",
            "bits_per_weight": None,
            "bytes": base_bytes,
            "perplexity": fp.perplexity,
            "quantize_s": None,
            "eval_s": fp.seconds,
        }
    )
    del model
    for directory, manifest in zip(args.quantized, manifests, strict=True):
        qmodel, _ = load_quantized(directory)
        totals = manifest.get("metadata", {}).get("report", {})
        result = perplexity(qmodel, tokens)
        rows.append(
            {
                "model": directory,
                "bits_per_weight": totals.get("avg_bits_per_weight"),
                "bytes": model_bytes(qmodel),
                "perplexity": result.perplexity,
                "quantize_s": totals.get("seconds"),
                "eval_s": result.seconds,
            }
        )
        del qmodel
    print(format_eval_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def format_eval_table(rows: list[dict]) -> str:
    """The comparison table: one row per model, perplexity change against the first row."""
    base = rows[0]
    width = max(len("model"), *(len(r["model"]) for r in rows))
    head = (
        f"{'model':<{width}}  {'bits/w':>6}  {'size MiB':>8}  {'vs fp':>6}  "
        f"{'ppl':>8}  {'Δppl':>7}  {'quant s':>7}  {'eval s':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        bits = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        qs = "-" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
        delta = "-" if r is base else f"{r['perplexity'] - base['perplexity']:+.3f}"
        lines.append(
            f"{r['model']:<{width}}  {bits:>6}  {r['bytes'] / 2**20:>8.1f}  "
            f"{base['bytes'] / r['bytes']:>5.2f}x  {r['perplexity']:>8.3f}  {delta:>7}  "
            f"{qs:>7}  {r['eval_s']:>6.1f}"
        )
    lines.append(
        "bits/w: stored bits per weight of the quantized Linear layers (codes, scales, "
        "zero points); size: every tensor of the model, tied ones once."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
