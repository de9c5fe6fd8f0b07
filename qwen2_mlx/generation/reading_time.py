"""How long reading a prompt takes on this machine: a cost per token plus a cost per token and key.

A prefill's matmuls cost the same for every token, but its attention grows with the keys each token
reads, so one tokens/s figure taken on a short read underestimates a long one many times over on a CPU
(docs/chat-app.md#what-a-read-will-cost). Both costs are measured here: a short read at an empty context,
and the model's attention over a longer cache (random tensors of its shape, the same kernel).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

CALIBRATION_QUERIES = 256  # as in a prefill tile: enough queries that the kernel's per-call cost is small
CALIBRATION_KEYS = (512, 4096)  # two cache lengths: the slope between them is the per-key cost


@dataclass(frozen=True)
class ReadingSpeed:
    """Seconds to read tokens `start..end` (the cache already holding `start`): each token costs
    `seconds_per_token` plus `seconds_per_key` for every key it attends to, itself included."""

    seconds_per_token: float
    seconds_per_key: float = 0.0
    source: str = "a short calibration"

    def seconds(self, start: int, end: int) -> float:
        n = max(0, end - start)
        return n * self.seconds_per_token + self.seconds_per_key * n * (start + end + 1) / 2

    def tokens_per_s(self, start: int, end: int) -> float:
        """The average rate over `start..end`."""
        s = self.seconds(start, end)
        return (end - start) / s if s > 0 else 0.0

    def scaled(self, factor: float, source: str) -> ReadingSpeed:
        """Both costs times `factor` (what a real read took over what this predicted for it)."""
        return replace(self, seconds_per_token=self.seconds_per_token * factor,
                       seconds_per_key=self.seconds_per_key * factor, source=source)  # fmt: skip


def _attention_seconds(args, keys: int, dtype, runs: int = 3) -> float:
    """The best of `runs` timings of all layers' attention for CALIBRATION_QUERIES queries over `keys`."""
    import mlx.core as mx  # here, so the chat app's server mode never loads MLX

    hq, hkv, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    q = mx.random.normal((1, hq, CALIBRATION_QUERIES, d)).astype(dtype)
    k, v = (mx.random.normal((1, hkv, keys, d)).astype(dtype) for _ in range(2))
    mx.eval(q, k, v)
    best = float("inf")
    for _ in range(runs + 1):  # the first call compiles and allocates
        tic = time.perf_counter()
        mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5))
        best = min(best, time.perf_counter() - tic)
    return best * args.num_hidden_layers


def attention_seconds_per_key(model, dtype) -> float:
    """The model's attention cost per query and key, all layers: the slope between two cache lengths."""
    a, b = CALIBRATION_KEYS
    slope = (_attention_seconds(model.args, b, dtype) - _attention_seconds(model.args, a, dtype)) / (b - a)
    return max(0.0, slope / CALIBRATION_QUERIES)


def measure_reading_speed(model, tokenizer, tokens: int = 256) -> ReadingSpeed:
    """A short read into a throwaway cache (after a warm-up), less its attention, and the attention's slope."""
    from .generate import prefill_prompt_cache

    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * (tokens // 4))
    ids = (ids * (tokens // max(len(ids), 1) + 1))[:tokens]
    prefill_prompt_cache(model, tokenizer, ids[:16])  # first-call costs are not reading speed
    tic = time.perf_counter()
    prefill_prompt_cache(model, tokenizer, ids)
    seconds = time.perf_counter() - tic
    per_key = attention_seconds_per_key(model, model.model.norm.weight.dtype)  # never quantized
    keys_read = len(ids) * (len(ids) + 1) / 2
    per_token = max(seconds - per_key * keys_read, seconds / 2) / len(ids)
    return ReadingSpeed(per_token, per_key)
