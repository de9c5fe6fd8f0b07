"""Speculative decoding benchmark: `python -m qwen2_mlx.bench --model PATH --lookup` (or `--draft-model`).

Runs the task set (`tasks/speculative.json`: code edits, quotes from a document, multi-turn chats,
free-form writing; English and Chinese) with plain greedy decoding and with prompt lookup or a draft
model, alternating per task so load on a shared machine hits both alike, and prints per task the
decode tokens/s of each, their ratio, the acceptance rate, tokens per forward and whether the
greedy tokens were identical. `--compare-mlx-lm` with `--draft-model` adds mlx-lm's own draft
decoding on the same pair (mlx-lm has no prompt lookup).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

TASKS = Path(__file__).with_name("tasks") / "speculative.json"


def load_tasks(path: Optional[str] = None, names: Optional[list[str]] = None) -> list[dict]:
    """The task set (one clear error for a bad file or an unknown task name)."""
    p = Path(path).expanduser() if path else TASKS
    try:
        tasks = json.loads(p.read_text(encoding="utf-8"))["tasks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: not a task file with a 'tasks' list ({e})") from None
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or not {"name", "kind", "messages"} <= set(t):
            raise ValueError(f"{p}: tasks[{i}] needs 'name', 'kind' and 'messages'")
    if names:
        unknown = sorted(set(names) - {t["name"] for t in tasks})
        if unknown:
            raise ValueError(f"unknown task {', '.join(unknown)} (the set has {', '.join(t['name'] for t in tasks)})")
        tasks = [t for t in tasks if t["name"] in names]
    return tasks


def _ours(model, tokenizer, prompt, max_tokens, **kw) -> dict:
    from qwen2_mlx import stream_generate

    rs = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kw))
    last = rs[-1]
    return {
        "tps": last.generation_tps,
        "tokens": [r.token for r in rs if r.generation_tokens],
        "acceptance": last.accepted_tokens / last.proposed_tokens if last.proposed_tokens else 0.0,
        "tokens_per_forward": last.generation_tokens / last.forward_passes if last.forward_passes else 1.0,
    }


def _mlx_lm(model, tokenizer, prompt, max_tokens, draft_model, num_draft_tokens) -> dict:
    from mlx_lm import stream_generate

    rs = list(
        stream_generate(
            model, tokenizer, prompt, max_tokens=max_tokens, draft_model=draft_model, num_draft_tokens=num_draft_tokens
        )
    )
    drafted = sum(r.from_draft for r in rs)
    return {"tps": rs[-1].generation_tps, "tokens": [r.token for r in rs], "drafted": drafted}


def _mlx_lm_load(path: Path, ours):
    """mlx-lm's model over the same tensors as ours (identical names), as bench.compare does."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten

    theirs, tok = mlx_lm.load(str(path), lazy=True)
    theirs.load_weights(list(tree_flatten(ours.parameters())), strict=True)
    mx.eval(theirs.parameters())
    return theirs, tok


def run(args, log) -> dict:
    """Load the model (and draft), run every task; returns the figures."""
    import mlx.core as mx

    from qwen2_mlx import load
    from qwen2_mlx.generation.proposers import check_draft, check_draft_tokenizer

    dtype = getattr(mx, args.dtype) if args.dtype else None
    path = Path(args.model).expanduser()
    log(f"loading {path} ...")
    model, tokenizer = load(path, dtype=dtype)
    spec: dict = {"lookup": True} if args.lookup else {}
    draft = theirs = None
    if args.draft_model:
        draft_path = Path(args.draft_model).expanduser()
        same = draft_path.resolve() == path.resolve()  # a model as its own draft: one copy of the weights
        log(f"loading the draft {draft_path} ...")
        draft, draft_tok = (model, tokenizer) if same else load(draft_path, dtype=dtype)
        check_draft_tokenizer(tokenizer, draft_tok)
        check_draft(model, draft)
        spec = {"draft_model": draft, "num_draft_tokens": args.num_draft_tokens}
        if args.compare_mlx_lm:
            their_model, their_tok = _mlx_lm_load(path, model)
            theirs = (their_model, their_model if same else _mlx_lm_load(draft_path, draft)[0], their_tok)
    tasks = load_tasks(args.tasks_file, args.task)
    method = "lookup" if args.lookup else "draft"
    rows = []
    for t in tasks:
        text = tokenizer.apply_chat_template(t["messages"], add_generation_prompt=True, tokenize=False)
        prompt = tokenizer.encode(text, add_special_tokens=False)  # the same ids for both libraries
        n = args.gen_tokens or t.get("max_tokens", 128)
        runs: dict = {"plain": [], method: [], "mlx_lm_draft": []}
        _ours(model, tokenizer, prompt, 4)  # warm-up for this prompt length
        jobs = [
            ("plain", _ours, (model, tokenizer, prompt, n), {}),
            (method, _ours, (model, tokenizer, prompt, n), spec),
        ]
        if theirs is not None:
            their_model, their_draft, their_tok = theirs
            their_args = (their_model, their_tok, prompt, n, their_draft, args.num_draft_tokens)
            jobs.append(("mlx_lm_draft", _mlx_lm, their_args, {}))
        for r in range(args.runs):
            # The order turns from run to run and task to task: whichever runs first is not always favoured.
            shift = (r + len(rows)) % len(jobs)
            for name, fn, fn_args, kw in jobs[shift:] + jobs[:shift]:
                runs[name].append(fn(*fn_args, **kw))
        row = {
            "name": t["name"],
            "kind": t["kind"],
            "lang": t.get("lang", ""),
            "tokens": len(runs["plain"][0]["tokens"]),
            "plain_tps": statistics.median(r["tps"] for r in runs["plain"]),
            "spec_tps": statistics.median(r["tps"] for r in runs[method]),
            "acceptance": runs[method][0]["acceptance"],
            "tokens_per_forward": runs[method][0]["tokens_per_forward"],
            "identical": runs[method][0]["tokens"] == runs["plain"][0]["tokens"],
        }
        row["speedup"] = row["spec_tps"] / row["plain_tps"]
        if runs["mlx_lm_draft"]:
            row["mlx_lm_tps"] = statistics.median(r["tps"] for r in runs["mlx_lm_draft"])
            row["ours_over_mlx_lm"] = row["spec_tps"] / row["mlx_lm_tps"]
        log(
            f"{t['name']:20s} plain {row['plain_tps']:6.2f} tok/s  {method} {row['spec_tps']:6.2f} tok/s  "
            f"x{row['speedup']:.2f}  accept {row['acceptance']:.0%}  {row['tokens_per_forward']:.2f} t/fwd"
        )
        rows.append(row)
    return {
        "model": str(args.model),
        "method": method,
        "draft_model": args.draft_model,
        "runs": args.runs,
        "num_draft_tokens": args.num_draft_tokens if draft is not None else None,
        "tasks": rows,
        "by_kind": _by_kind(rows),
    }


def _by_kind(rows: list[dict]) -> dict:
    """Geometric means of the speed-ups (and of ours over mlx-lm's) per kind of task."""
    kinds = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        kinds[kind] = {"speedup_geomean": statistics.geometric_mean(r["speedup"] for r in mine)}
        if all("ours_over_mlx_lm" in r for r in mine):
            kinds[kind]["ours_over_mlx_lm_geomean"] = statistics.geometric_mean(r["ours_over_mlx_lm"] for r in mine)
    return kinds


def report(res: dict) -> str:
    m = res["method"]
    mlx = any("mlx_lm_tps" in r for r in res["tasks"])
    head = f"{'task':20s}{'kind':>10s}{'lang':>5s}{'tokens':>7s}{'plain t/s':>11s}{m + ' t/s':>12s}{'ratio':>7s}"
    head += f"{'accept':>8s}{'t/fwd':>7s}{'same':>6s}" + (f"{'mlx-lm t/s':>12s}{'ours/mlx':>9s}" if mlx else "")
    lines = [
        f"model: {res['model']}  method: {m}"
        + (f" ({res['draft_model']}, {res['num_draft_tokens']} tokens)" if res["draft_model"] else ""),
        head,
    ]
    for r in res["tasks"]:
        line = (
            f"{r['name']:20s}{r['kind']:>10s}{r['lang']:>5s}{r['tokens']:7d}{r['plain_tps']:11.2f}{r['spec_tps']:12.2f}"
            f"{r['speedup']:6.2f}x{r['acceptance']:7.0%}{r['tokens_per_forward']:7.2f}"
            f"{'yes' if r['identical'] else 'NO':>6s}"
        )
        if "mlx_lm_tps" in r:
            line += f"{r['mlx_lm_tps']:12.2f}{r['ours_over_mlx_lm']:8.2f}x"
        lines.append(line)
    for kind, k in res["by_kind"].items():
        extra = f", ours/mlx-lm {k['ours_over_mlx_lm_geomean']:.2f}x" if "ours_over_mlx_lm_geomean" in k else ""
        lines.append(f"{kind}: {m}/plain {k['speedup_geomean']:.2f}x (geometric mean){extra}")
    return "\n".join(lines)
