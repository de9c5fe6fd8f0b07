"""One retrieval trial: prefill a haystack prompt, greedy-decode a few tokens, compare the digits."""

from __future__ import annotations

import time
from typing import Optional

from qwen2_mlx.generation.generate import generate
from qwen2_mlx.generation.settings import GenerationSettings

from .prompts import HaystackPrompt, first_number


def answer(
    model,
    tokenizer,
    prompt: HaystackPrompt,
    settings: GenerationSettings,
    bar=None,
) -> dict:
    """Run one prompt; the record says what was expected, what came back and whether it matched.

    With a tqdm `bar`, its postfix follows the prefill (a long prompt on a CPU takes minutes)."""

    def on_prefill(done: int, total: int) -> None:
        bar.set_postfix_str(f"prefill {done}/{total}")

    tic = time.perf_counter()
    got = generate(
        model,
        tokenizer,
        prompt.tokens,
        settings=settings,
        prompt_progress_callback=on_prefill if bar is not None else None,
    )
    return {
        "tokens": len(prompt.tokens),
        "needle_token": prompt.needle_token,
        "expected": prompt.expected,
        "got": got.strip(),
        "ok": first_number(got) == prompt.expected,
        "seconds": round(time.perf_counter() - tic, 2),
    }


def trial_settings(max_tokens: int, prefill_step_size: int, kv: Optional[dict] = None) -> GenerationSettings:
    """A trial's settings: greedy, a few tokens, the eval's prefill step and KV-cache quantization."""
    return GenerationSettings(max_tokens=max_tokens, prefill_step_size=prefill_step_size, **(kv or {}))


def spread_depth(i: int) -> float:
    """The i-th depth of the van der Corput sequence from 1/2: 50%, 25%, 75%, 12.5%, 62.5%, ...

    Any first K trials cover the haystack evenly, and trial i's depth does not depend on K, so a
    resumed run with more trials keeps the finished ones valid."""
    n, depth, base = i + 1, 0.0, 0.5
    while n:
        depth += base * (n & 1)
        n >>= 1
        base /= 2
    return depth
