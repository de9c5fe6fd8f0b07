"""`python -m qwen2_mlx.eval lm-eval --tasks ...`: lm-evaluation-harness tasks on a model folder.

The model is lm_eval_adapter.py's `qwen2-mlx`; everything else (tasks, few-shot, metrics, the
table) is lm-eval's own `simple_evaluate`. `--include-path DIR` adds task YAML files from a folder
(local JSON tasks run offline); `--results FILE` is lm-eval's request cache, so a re-run skips the
requests already answered.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwen2_mlx.runtime.packages import require

from .common import EvalError, add_model_args, check_out
from .results import write_json


def add_parser(sub) -> None:
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks (log-likelihood, perplexity, generation)")
    p.add_argument("--tasks", required=True, metavar="NAME,...", help="lm-eval task or group names")
    p.add_argument("--include-path", type=Path, default=None, metavar="DIR", help="a folder of task YAML files")
    p.add_argument("--limit", type=float, default=None, metavar="N", help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples per prompt")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per forward (%(default)s)")
    p.add_argument("--max-gen-toks", type=int, default=256, metavar="N", help="generation cap per request")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the chat template")
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's seeds for few-shot sampling (%(default)s)")
    add_model_args(p)


def _validate(args) -> None:
    if args.json is not None:
        check_out(args.json, "--json")
    if args.include_path is not None and not args.include_path.is_dir():
        raise EvalError(f"--include-path {args.include_path}: no such folder")
    if args.batch_size <= 0 or args.max_gen_toks <= 0:
        raise EvalError("--batch-size and --max-gen-toks must be positive")
    if args.kv_bits:
        raise EvalError("--kv-bits: lm-eval requests run with a float KV cache; drop the switch")
    require("lm_eval", "python -m qwen2_mlx.eval lm-eval")


def run(args: argparse.Namespace) -> dict:
    _validate(args)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .common import load_for_eval
    from .lm_eval_adapter import Qwen2MLXLM

    manager = TaskManager(include_path=str(args.include_path) if args.include_path else None)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise EvalError(f"--tasks: unknown task {unknown[0]!r} (with --include-path {args.include_path})")
    loaded = load_for_eval(args)
    lm = Qwen2MLXLM(
        str(loaded.path),
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        batch_size=args.batch_size,
        max_gen_toks=args.max_gen_toks,
        prefill_step_size=args.prefill_step_size,
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=manager,
        apply_chat_template=args.apply_chat_template,
        use_cache=str(args.results) if args.results else None,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
        log_samples=False,
    )
    summary = {"command": "lm-eval", "settings": {**loaded.settings, "tasks": tasks}, "results": out["results"]}
    if args.json is not None:
        write_json(args.json, summary)
    print(lm_eval.utils.make_table(out), flush=True)
    return summary
