"""`batch_generate`: many prompts decoded together, for evaluation loops.

Prompts are sorted by length and run in groups of `batch_size`, left-padded into one batch over
mlx-lm's `BatchKVCache`: its per-row offsets start each real token at position 0 and its mask hides
the padding, so every row computes what it would alone (greedy results equal one-by-one results).
A row that finishes leaves the batch (`BatchKVCache.filter`), so short answers cost nothing later.
Under Dual Chunk Attention (on by default) rows that stay within `chunk_size + 1` tokens are batched
(DCA is plain attention there); a row that may go further runs alone on the model's DCA caches.
Each row has its own stop strings filter and finish reason, exactly as `stream_generate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache

from qwen2_mlx.models.dca import DCAGeometry

from .generate import (
    ContextOverflowError,
    GenerationStats,
    Reply,
    StopStringFilter,
    as_wrapper,
    build_sampler,
    context_limit,
    fresh_detokenizer,
    generation_stream,
)
from .kv_quant import KVQuantization, quantize_batch_cache, quantizer
from .prompt_cache import make_prompt_cache
from .settings import GenerationSettings

Prompt = Union[str, Sequence[int], Sequence[dict]]


@dataclass
class BatchStats:
    """Totals over the whole call; rates are tokens over wall time of that phase."""

    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_time: float = 0.0
    peak_memory: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time else 0.0


@dataclass
class BatchResponse:
    """`texts[i]` answers `prompts[i]`: a `Reply` (a str with `.finish_reason` and `.stats`)."""

    texts: list
    stats: BatchStats
    token_ids: list = field(default_factory=list)

    @property
    def finish_reasons(self) -> list:
        return [t.finish_reason for t in self.texts]


def _encode(tokenizer, prompt: Prompt, i: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    elif prompt and all(isinstance(m, dict) for m in prompt):
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    elif all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise TypeError(f"prompts[{i}]: a prompt is a string, a list of token ids or a list of messages")
    if not ids:
        raise ValueError(f"prompts[{i}] is empty")
    return list(ids)


class _Row:
    """One prompt's progress: its generated ids, text filter and limits."""

    def __init__(self, index: int, prompt: list[int], limit: int, length_reason: str, detok, stop):
        self.index, self.prompt, self.limit, self.length_reason = index, prompt, limit, length_reason
        self.filter = StopStringFilter(detok, stop)
        self.tokens: list[int] = []
        self.parts: list[str] = []
        self.reason: Optional[str] = None
        self.history = mx.array(prompt, dtype=mx.uint32)  # for logits processors only

    def add(self, token: int, eos: set) -> bool:
        """Take one generated token; True when the row is finished."""
        self.tokens.append(token)
        if token in eos:
            self.reason = "stop"
        else:
            self.parts.append(self.filter.add(token))
            if self.filter.stopped:
                self.reason = "stop"
            elif len(self.tokens) >= self.limit:
                self.reason = self.length_reason
        if self.reason is None:
            return False
        if not self.filter.stopped:
            self.parts.append(self.filter.finish())
        return True


_DEFAULT: Any = object()  # "not given": the settings' own max_tokens holds
_UNSUPPORTED = ("draft_model", "lookup", "json_schema", "max_context")


def batch_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    max_tokens: Union[int, Sequence[int], None] = _DEFAULT,
    *,
    batch_size: int = 16,
    verbose: bool = False,
    settings: Optional[GenerationSettings] = None,
    **kwargs: Any,
) -> BatchResponse:
    """Generate a completion for every prompt, decoding up to `batch_size` of them together.

    A prompt is a string (encoded as is), token ids, or a list of chat messages (the chat
    template is applied). `max_tokens` is one limit or one per prompt (None: until the end of
    the turn or the context window). Sampling, stopping and KV-cache settings are `stream_generate`'s
    (`settings=` and keyword settings); speculative decoding and JSON schemas are not for batches.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    per_prompt = isinstance(max_tokens, (list, tuple))
    if max_tokens is not _DEFAULT and not per_prompt:
        kwargs["max_tokens"] = max_tokens
    s = GenerationSettings.build(settings, **kwargs)
    for name in _UNSUPPORTED:
        if getattr(s, name) not in (None, False):
            raise ValueError(f"batch_generate does not take {name}; use stream_generate")
    kv = KVQuantization.make(s.kv_bits, s.kv_group_size, s.quantized_kv_start, model)
    tokenizer = as_wrapper(tokenizer)
    encoded = [_encode(tokenizer, p, i) for i, p in enumerate(prompts)]
    limits = _limits(list(max_tokens) if per_prompt else [s.max_tokens] * len(encoded), len(encoded))
    window = context_limit(model)
    vocab = model.args.vocab_size
    for i, ids in enumerate(encoded):
        wrong = next((t for t in ids if not 0 <= t < vocab), None)
        if wrong is not None:  # the embedding lookup is not bounds-checked
            raise ValueError(f"prompts[{i}]: token id {wrong} is outside the vocabulary (0..{vocab - 1})")
        if len(ids) >= window:
            raise ContextOverflowError(
                f"prompts[{i}] ({len(ids)} tokens) does not fit the context window of {window} tokens"
            )
    if s.seed is not None:
        mx.random.seed(s.seed)
    sample, procs = build_sampler(s, model.args.vocab_size)
    eos = set(tokenizer.eos_token_ids or [])
    stats = BatchStats()
    results: list[Optional[_Row]] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        rows = [_row(i, encoded[i], limits[i], window, tokenizer, s.stop) for i in order[start : start + batch_size]]
        batch = [r for r in rows if _fits_batch(model, r)]
        with mx.stream(generation_stream):  # a row that may pass DCA's plain range runs alone, on DCA caches
            for group in ([batch] if batch else []) + [[r] for r in rows if r not in batch]:
                _run_group(model, group, sample, procs, eos, s.prefill_step_size, stats, kv, alone=group is not batch)
        for r in rows:
            results[r.index] = r
        if verbose:
            print(f"[batch_generate] {min(start + batch_size, len(order))}/{len(order)} prompts done", flush=True)
    stats.peak_memory = mx.get_peak_memory() / 1e9
    texts = [
        Reply("".join(r.parts), r.reason, GenerationStats(prompt_tokens=len(r.prompt), generation_tokens=len(r.tokens)))
        for r in results
    ]
    if verbose:
        print(
            f"[batch_generate] prompt: {stats.prompt_tokens} tok, {stats.prompt_tps:.1f} tok/s; "
            f"generation: {stats.generation_tokens} tok, {stats.generation_tps:.1f} tok/s; "
            f"peak memory {stats.peak_memory:.2f} GB"
        )
    return BatchResponse(texts, stats, [r.tokens for r in results])


def _limits(limits: list, n: int) -> list:
    """One max_tokens per prompt, negative ones meaning none (mlx-lm), zero refused."""
    if len(limits) != n:
        raise ValueError(f"max_tokens has {len(limits)} entries for {n} prompts")
    limits = [None if m is not None and m < 0 else m for m in limits]
    if any(m == 0 for m in limits):
        raise ValueError("max_tokens must be positive (or None for no limit)")
    return limits


def _row(i: int, prompt: list[int], max_tokens: Optional[int], window: int, tokenizer, stop) -> _Row:
    room = window - len(prompt)
    limit = room if max_tokens is None else min(max_tokens, room)
    reason = "length" if max_tokens is not None and max_tokens <= room else "context"
    return _Row(i, prompt, limit, reason, fresh_detokenizer(tokenizer), stop)


def _fits_batch(model: nn.Module, row: _Row) -> bool:
    """Whether a row may share a batch cache: always, or under DCA while it stays within plain attention."""
    dca = getattr(model.args, "dual_chunk_attention_config", None)
    if dca is None:
        return True
    geom = DCAGeometry.from_config(dca)
    return geom.plain_exact and len(row.prompt) + row.limit <= geom.plain_limit


def _group_cache(model: nn.Module, rows: list[_Row], padding: list[int], kv, alone: bool):
    """The cache of a group and its after-forward quantization: a batch cache, or the model's own for one row."""
    if not alone:
        return [BatchKVCache(padding) for _ in model.layers], lambda c: quantize_batch_cache(c, kv)
    cache = make_prompt_cache(model)
    for c in cache:  # DCA caches give every prompt key the temperature of the whole prompt
        if hasattr(c, "length_hint"):
            c.length_hint = len(rows[0].prompt)
    return cache, quantizer(kv)


def _run_group(
    model: nn.Module,
    rows: list[_Row],
    sample: Callable,
    procs: list,
    eos: set,
    prefill_step_size: int,
    stats: BatchStats,
    kv: Optional[KVQuantization] = None,
    alone: bool = False,
) -> None:
    tic = time.perf_counter()
    width = max(len(r.prompt) for r in rows)
    padding = [width - len(r.prompt) for r in rows]
    tokens = mx.array([[0] * p + r.prompt for p, r in zip(padding, rows)], dtype=mx.uint32)
    cache, quantize = _group_cache(model, rows, padding, kv, alone)

    # Prefill all but the last column, evaluating only the cache; the last goes through the head.
    for a in range(0, width - 1, prefill_step_size):
        model(tokens[:, a : min(a + prefill_step_size, width - 1)], cache=cache)
        quantize(cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()

    live = list(rows)

    def step(inputs: mx.array, generated: bool):
        logits = model(inputs, cache=cache)[:, -1, :]
        quantize(cache)
        if procs:
            rows_logits = []
            for k, r in enumerate(live):
                if generated:
                    r.history = mx.concatenate([r.history, inputs[k]])
                row = logits[k : k + 1]
                for proc in procs:
                    row = proc(r.history, row)
                rows_logits.append(row)
            logits = mx.concatenate(rows_logits, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sample(logprobs)

    y = step(tokens[:, -1:], generated=False)
    mx.eval(y)
    stats.prompt_time += time.perf_counter() - tic
    stats.prompt_tokens += sum(len(r.prompt) for r in rows)

    tic = time.perf_counter()
    n = 0
    while live:
        # Queue the next step before reading this one (the step of a finishing row is dropped below).
        next_y = step(y[:, None], generated=True) if any(len(r.tokens) + 1 < r.limit for r in live) else None
        if next_y is not None:
            mx.async_eval(next_y)
        keep = [k for k, (r, t) in enumerate(zip(live, y.tolist())) if not r.add(t, eos)]
        stats.generation_tokens += len(live)
        if next_y is None or not keep:
            break
        if len(keep) < len(live):
            for c in cache:
                c.filter(keep)
            idx = mx.array(keep)
            next_y = next_y[idx]
            live = [live[k] for k in keep]
        y = next_y
        n += 1
        if n % 256 == 0:
            mx.clear_cache()
    stats.generation_time += time.perf_counter() - tic
