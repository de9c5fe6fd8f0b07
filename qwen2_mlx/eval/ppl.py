"""Perplexity with a sliding window (Hugging Face's strided method).

Windows of `context` tokens start every `stride` tokens; each window scores only the tokens it adds
beyond the previous window's end, so every token is scored once, with up to `context - stride`
tokens of history. The window runs through the KV cache in prefill steps (the same path as
generation, so DCA and YaRN apply exactly as they do there) and the output head runs only on the
positions that are scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import mlx.core as mx

from qwen2_mlx.generation.kv_quant import KVQuantization, quantizer
from qwen2_mlx.generation.prompt_cache import make_prompt_cache

from .results import ResultsFile


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index within the window) for HF's strided loop over n tokens."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        target = end - prev_end
        out.append((begin, end, max(1, (end - begin) - target)))  # index 0 has no prediction
        prev_end = end
        if end == n:
            break
    return out


def _head(model, h: mx.array) -> mx.array:
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def window_nll(
    model, tokens: Sequence[int], first: int, prefill_step_size: int = 512, kv: Optional[dict] = None
) -> tuple[float, int]:
    """Sum of -log p(token) over tokens[first:] given the tokens before them in the window
    (`kv`: KV-cache quantization settings, applied after each step as generation applies them)."""
    quantize = quantizer(KVQuantization.make(**kv, model=model) if kv else None)
    x = mx.array(list(tokens), dtype=mx.uint32)
    n = x.size
    cache = make_prompt_cache(model)
    for c in cache:  # DCA caches set their temperature from the whole sequence, as generation does
        if hasattr(c, "length_hint"):
            c.length_hint = n
    total, count = 0.0, 0
    for s in range(0, n, prefill_step_size):
        e = min(s + prefill_step_size, n)
        h = model.model(x[s:e][None], cache=cache)
        quantize(cache)
        # Position p predicts token p + 1; scored tokens are first..n-1, so p runs first-1..n-2.
        a, b = max(s, first - 1), min(e, n - 1)
        if a < b:
            logits = _head(model, h[:, a - s : b - s]).astype(mx.float32)[0]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            targets = x[a + 1 : b + 1]
            nll = -mx.take_along_axis(logprobs, targets[:, None].astype(mx.int32), axis=-1).sum()
            mx.eval(nll, [c.state for c in cache])
            total += nll.item()
            count += b - a
        else:
            mx.eval([c.state for c in cache])
    return total, count


def perplexity(
    model,
    tokens: Sequence[int],
    context: int,
    stride: int,
    results: Optional[ResultsFile] = None,
    prefill_step_size: int = 512,
    bar=None,
    kv: Optional[dict] = None,
) -> dict:
    """Run (or resume) the strided evaluation; returns perplexity, scored token count and per-window sums."""
    if len(tokens) < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    results = results or ResultsFile(None, {})
    total, count, records = 0.0, 0, []
    for begin, end, first in windows(len(tokens), context, stride):
        unit = f"window:{begin}"
        record = results.get(unit)
        if record is None:
            nll, scored = window_nll(model, tokens[begin:end], first, prefill_step_size, kv)
            record = results.add({"id": unit, "begin": begin, "end": end, "scored": scored, "nll": nll})
        records.append(record)
        total += record["nll"]
        count += record["scored"]
        if bar is not None:
            bar.update(1)
    mean = total / count
    return {
        "perplexity": math.exp(mean),
        "nll_per_token": mean,
        "tokens": len(tokens),
        "scored_tokens": count,
        "windows": records,
    }
