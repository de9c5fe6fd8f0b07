"""`python -m qwen2_mlx.eval {passkey,niah,ppl,quality,humaneval,lm-eval}`: evaluation from the command line.

passkey, niah and ppl test long contexts; quality compares a (quantized) model with a reference
(quality_cli.py); humaneval scores a model as its authors did (humaneval_cli.py); lm-eval runs lm-evaluation-harness
tasks (lm_eval_cli.py).

Progress goes to stderr, results to stdout (and to --json FILE); --results FILE makes a long run
resumable. User errors, and a package the outputs need that is not installed (matplotlib for the
heatmap), print one line and exit with status 2 before the model is loaded. Results are written as
JSON before anything is drawn from them.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from qwen2_mlx.runtime.blas import ensure_openblas
from qwen2_mlx.runtime.packages import MissingPackage, require

from . import humaneval_cli, lm_eval_cli, quality_cli
from .common import EvalError, add_model_args, load_for_eval, parse_int_list, progress
from .common import check_out as _check_out
from .common import read_text as _read_text
from .results import ResultsError, ResultsFile, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwen2_mlx.eval",
        description="Long-context evaluation (passkey retrieval, needle in a haystack, sliding-window perplexity) "
        "and the quality of a quantized model against a reference.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("passkey", help="retrieve a 5-digit pass key hidden in filler text")
    p.add_argument("--length", type=int, required=True, metavar="N", help="prompt length in tokens")
    p.add_argument("--trials", type=int, default=5, metavar="K", help="number of trials (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for the keys (default: %(default)s)")
    add_model_args(p)

    p = sub.add_parser("niah", help="needle-in-a-haystack grid of lengths x depths, drawn as a heatmap")
    p.add_argument("--lengths", required=True, metavar="N,N,...", help="context lengths in tokens")
    p.add_argument(
        "--depths", default="0,25,50,75,100", metavar="D,D,...", help="needle depths in percent (default: %(default)s)"
    )
    p.add_argument("--trials", type=int, default=1, metavar="K", help="trials per cell (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for needles and filler order (default: %(default)s)")
    p.add_argument(
        "--haystack",
        type=Path,
        default=None,
        metavar="TEXT",
        help="a text file to use as filler instead of the built-in sentences",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE.png",
        help="the heatmap; the raw grid is written beside it as FILE.json",
    )
    p.add_argument("--title", default=None, help="figure title (default: model and long-context settings)")
    add_model_args(p)

    p = sub.add_parser("ppl", help="perplexity of a text file with a sliding window")
    p.add_argument("--file", type=Path, required=True, metavar="TEXT", help="a UTF-8 text file")
    p.add_argument("--context", type=int, default=4096, metavar="N", help="window length (default: %(default)s)")
    p.add_argument(
        "--stride", type=int, default=None, metavar="S", help="tokens between window starts (default: context / 2)"
    )
    add_model_args(p)

    quality_cli.add_parser(sub)
    humaneval_cli.add_parser(sub)
    lm_eval_cli.add_parser(sub)
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Check every cheap argument before the model is loaded."""
    if args.json is not None:
        _check_out(args.json, "--json")
    if args.command in ("passkey", "niah") and args.trials <= 0:
        raise EvalError(f"--trials must be positive, got {args.trials}")
    if args.command == "passkey" and args.length <= 0:
        raise EvalError(f"--length must be positive, got {args.length}")
    if args.command == "niah":
        args.lengths = parse_int_list(args.lengths, "--lengths", minimum=1)
        args.depths = parse_int_list(args.depths, "--depths", minimum=0, maximum=100)
        if args.out.suffix.lower() != ".png":
            raise EvalError(f"--out {args.out}: the heatmap is a PNG; give a file name ending in .png")
        _check_out(args.out, "--out")
    if args.command == "ppl":
        if args.context < 2:
            raise EvalError(f"--context must be at least 2, got {args.context}")
        if args.stride is None:
            args.stride = max(1, args.context // 2)
        if not 1 <= args.stride <= args.context:
            raise EvalError(f"--stride must be within 1..--context ({args.context}), got {args.stride}")
    if args.results is not None:
        outputs = [(args.json, "--json")]
        if args.command == "niah":
            outputs.append((args.out.with_suffix(".json"), "--out's grid"))
        for path, what in outputs:
            if path is not None and path.absolute() == args.results.absolute():
                raise EvalError(
                    f"--results {args.results}: the same file as {what}, which would overwrite it; "
                    "give the results file another name"
                )
    _check_packages(args)


def _check_packages(args: argparse.Namespace) -> None:
    """The packages the outputs need, before any work (runtime/packages.py); MissingPackage if one is absent."""
    require("tqdm", "the progress bar")
    if args.command == "niah":
        require("matplotlib", f"the NIAH heatmap (--out {args.out})")


def _settings(args: argparse.Namespace, model_settings: dict, extra: dict) -> dict:
    return {"command": args.command, **model_settings, **extra}


def run(args: argparse.Namespace) -> dict:
    """Run one subcommand; returns the JSON-ready summary (and prints the report on stdout)."""
    from qwen2_mlx.eval import niah, passkey, ppl

    from .prompts import split_sentences

    delegated = {"quality": quality_cli.run, "humaneval": humaneval_cli.run, "lm-eval": lm_eval_cli.run}
    if args.command in delegated:
        return delegated[args.command](args)
    _validate(args)
    figure = haystack = text = None  # figure: the NIAH heatmap, drawn last from results already written
    if args.command == "niah" and args.haystack is not None:
        haystack = split_sentences(_read_text(args.haystack, "haystack"))
        if not haystack:
            raise EvalError(f"{args.haystack}: the haystack file has no text")
    if args.command == "ppl":
        text = _read_text(args.file, "text")
    lm = load_for_eval(args)
    _check_lengths(args, lm.tokenizer, haystack)

    if args.command == "passkey":
        results = ResultsFile(args.results, _settings(args, lm.settings, {"length": args.length, "seed": args.seed}))
        with progress(args.trials, "passkey") as bar:
            summary = passkey.run_passkey(
                lm.model, lm.tokenizer, args.length, args.trials, args.seed, results, args.prefill_step_size, bar, lm.kv
            )
        report = passkey.format_report(summary)
        summary = {"command": "passkey", "settings": results.settings, "length": args.length, **summary}

    elif args.command == "niah":
        extra = {"seed": args.seed, "haystack": _digest(args.haystack) if args.haystack else "built-in"}
        results = ResultsFile(args.results, _settings(args, lm.settings, extra))
        with progress(len(args.lengths) * len(args.depths) * args.trials, "niah") as bar:
            grid = niah.run_niah(
                lm.model,
                lm.tokenizer,
                args.lengths,
                args.depths,
                args.trials,
                args.seed,
                haystack,
                results,
                args.prefill_step_size,
                bar,
                lm.kv,
            )
        title = args.title or f"Needle in a haystack\n{lm.label}"
        summary = {"command": "niah", "settings": results.settings, "label": lm.label, "title": title, **grid}
        write_json(args.out.with_suffix(".json"), summary)  # the results first: a failed drawing loses nothing
        report = niah.format_report(grid) + f"\ngrid: {args.out.with_suffix('.json')}"
        figure = (grid, title)

    else:
        tokens = lm.tokenizer.encode(text, add_special_tokens=False)
        if len(tokens) < 2:
            raise EvalError(f"{args.file}: fewer than 2 tokens of text; nothing to score")
        extra = {
            "file_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "context": args.context,
            "stride": args.stride,
        }
        results = ResultsFile(args.results, _settings(args, lm.settings, extra))
        with progress(len(ppl.windows(len(tokens), args.context, args.stride)), "ppl") as bar:
            summary = ppl.perplexity(
                lm.model, tokens, args.context, args.stride, results, args.prefill_step_size, bar, lm.kv
            )
        report = (
            f"perplexity: {summary['perplexity']:.4f}\ntokens: {summary['tokens']} "
            f"(scored {summary['scored_tokens']}, {len(summary['windows'])} windows)"
        )
        summary = {"command": "ppl", "settings": results.settings, "file": str(args.file), **summary}

    if args.json is not None:
        write_json(args.json, summary)
    print(report, flush=True)
    if figure is not None:
        niah.plot_heatmap(figure[0], args.out, figure[1])
        print(f"heatmap: {args.out}", flush=True)
    return summary


def _check_lengths(args: argparse.Namespace, tokenizer, haystack) -> None:
    """Refuse a length too short for the question before any results file is written."""
    from .prompts import NIAH_KEYS, niah_prompt, passkey_prompt

    try:
        if args.command == "passkey":
            passkey_prompt(tokenizer, args.length, 0.5, "12345")
        elif args.command == "niah":
            for key in NIAH_KEYS:  # every key a cell may draw, so no cell fails later for lack of room
                niah_prompt(tokenizer, min(args.lengths), 0.5, 0, haystack, key=key)
    except ValueError as e:
        flag = "--length" if args.command == "passkey" else "--lengths"
        raise EvalError(f"{flag}: {e}") from None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ensure_openblas(argv)  # Linux CPU: re-run with OpenBLAS preloaded (qwen2_mlx/runtime/blas.py)
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (EvalError, ResultsError, MissingPackage) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted" + (f"; finished units are kept in {args.results}" if args.results else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
