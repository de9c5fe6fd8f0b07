"""Passkey retrieval: a random 5-digit key hidden in repetitive filler at spread depths.

Each trial is a prompt of about `length` tokens (the longest that fits) with the key at the trial's
depth; the model is asked for it after the chat template's assistant header and "The pass key is",
so a greedy decode of a few tokens is the key itself.
"""

from __future__ import annotations

from typing import Optional

from .prompts import passkey_prompt, random_key
from .results import ResultsFile
from .retrieval import answer, spread_depth, trial_settings

MAX_NEW_TOKENS = 8  # a space, five digits and a full stop, with room to spare


def run_passkey(
    model,
    tokenizer,
    length: int,
    trials: int,
    seed: int = 0,
    results: Optional[ResultsFile] = None,
    prefill_step_size: int = 512,
    bar=None,
    kv: Optional[dict] = None,
) -> dict:
    """Run (or resume) `trials` trials; returns {"accuracy", "trials": [records]}."""
    settings = trial_settings(MAX_NEW_TOKENS, prefill_step_size, kv)
    results = results or ResultsFile(None, {})
    records = []
    for i in range(trials):
        unit = f"trial:{i}"
        record = results.get(unit)
        if record is None:
            depth = spread_depth(i)
            prompt = passkey_prompt(tokenizer, length, depth, random_key(seed, i))
            record = results.add(
                {
                    "id": unit,
                    "trial": i,
                    "depth": depth,
                    **answer(model, tokenizer, prompt, settings, bar),
                }
            )
        records.append(record)
        if bar is not None:
            bar.update(1)
    accuracy = sum(r["ok"] for r in records) / len(records) if records else 0.0
    return {"accuracy": accuracy, "trials": records}


def format_report(summary: dict) -> str:
    lines = [f"accuracy: {summary['accuracy']:.3f}"]
    for r in summary["trials"]:
        lines.append(
            f"trial {r['trial']}: depth {r['depth'] * 100:5.1f}%  tokens {r['tokens']}  "
            f"expected {r['expected']}  got {r['got']!r}  {'ok' if r['ok'] else 'FAIL'}"
        )
    return "\n".join(lines)
