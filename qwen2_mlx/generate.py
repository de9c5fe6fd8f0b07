"""Text generation: `generate_step` (tokens), `stream_generate` (text segments), `generate` (a string).

The loop follows mlx-lm's: a dedicated stream, chunked prefill that evaluates only the cache, the
last prompt token held back so the head runs on one position, and double-buffered decoding
(`mx.async_eval` of token n+1 before token n is read). On top of it: stop strings that never leak
into the text, a `finish_reason` that always says why it ended ("stop", "length", "context",
"cancelled"), cancellation through a `threading.Event`, and `max_tokens=None` for "until done".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .cache import make_prompt_cache
from .decode import decode_step

generation_stream = mx.new_thread_local_stream(mx.default_device())
DEFAULT_PREFILL_STEP_SIZE = 2048


@dataclass
class GenerationResponse:
    """One streamed step; the fields of mlx-lm's GenerationResponse."""

    text: str
    token: int
    logprobs: Optional[mx.array]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None
    from_draft: bool = False
    time_to_first_token: float = 0.0


def context_limit(model: nn.Module) -> int:
    """The longest sequence the model is configured for (DCA lifts the trained limit)."""
    args = model.args
    if getattr(args, "dual_chunk_attention_config", None) is not None:
        return max(args.max_position_embeddings, 1 << 30)
    return args.max_position_embeddings


def build_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                  repetition_penalty: Optional[float] = None, repetition_context_size: int = 20,
                  logit_bias: Optional[dict] = None, sampler=None, logits_processors=None):
    """mlx-lm's samplers and logits processors from plain keyword settings."""
    if sampler is None:
        sampler = make_sampler(temp=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    procs = list(logits_processors or [])
    procs += make_logits_processors(logit_bias=logit_bias, repetition_penalty=repetition_penalty,
                                    repetition_context_size=repetition_context_size)
    return sampler, procs


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: Optional[int] = 256,
    sampler: Optional[Callable] = None,
    logits_processors: Optional[Sequence[Callable]] = None,
    prompt_cache: Optional[list] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token, logprobs) pairs. `max_tokens=None` never stops by count."""
    if prompt.size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    progress = prompt_progress_callback or (lambda *_: None)
    history = prompt if logits_processors else None

    def step(tokens: mx.array):
        nonlocal history
        # Single tokens go through the compiled decode step when it applies (decode.py).
        logits = decode_step(model, tokens, cache)
        if logits is None:
            logits = model(tokens[None], cache=cache)[:, -1, :]
        if logits_processors:
            if history is not tokens:
                history = mx.concatenate([history, tokens])
            for proc in logits_processors:
                logits = proc(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    for c in cache:  # DCA caches give every prompt key the temperature of the whole prompt
        if hasattr(c, "length_hint"):
            c.length_hint = c.offset + prompt.size
    with mx.stream(generation_stream):
        total, done = prompt.size, 0
        progress(0, total)
        while total - done > 1:
            n = min(prefill_step_size, total - done - 1)
            model(prompt[done:done + n][None], cache=cache)
            mx.eval([c.state for c in cache])
            done += n
            progress(done, total)
            mx.clear_cache()
        y, logprobs = step(prompt[done:])
        mx.async_eval(y, logprobs)
        n = 0
        while True:
            if max_tokens is None or n + 1 < max_tokens:
                next_y, next_logprobs = step(y)
                mx.async_eval(next_y, next_logprobs)
            if n == 0:
                mx.eval(y)
                progress(total, total)
            yield y.item(), logprobs
            n += 1
            if max_tokens is not None and n >= max_tokens:
                return
            if n % 256 == 0:
                mx.clear_cache()
            y, logprobs = next_y, next_logprobs


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def encode_prompt(tokenizer, prompt: Union[str, Sequence[int], mx.array]) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        return mx.array(tokenizer.encode(prompt, add_special_tokens=False), dtype=mx.uint32)
    return mx.array(list(prompt), dtype=mx.uint32)


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    max_tokens: Optional[int] = 256,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    logit_bias: Optional[dict] = None,
    seed: Optional[int] = None,
    sampler: Optional[Callable] = None,
    logits_processors: Optional[Sequence[Callable]] = None,
    stop: Optional[Iterable[str]] = None,
    cancel: Optional[Any] = None,
    prompt_cache: Optional[list] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    temp: Optional[float] = None,
) -> Generator[GenerationResponse, None, None]:
    """Stream a completion as GenerationResponse segments; the last one carries `finish_reason`.

    `prompt` is a string (encoded as is, no special tokens added) or token ids. `stop` strings end
    generation and never appear in the text. `cancel` is anything with `is_set()` (a
    `threading.Event`); setting it from another thread ends the stream with "cancelled".
    """
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError("max_tokens must be positive (or None for no limit)")
    if temp is not None:  # mlx-lm's spelling
        temperature = temp
    if seed is not None:
        mx.random.seed(seed)
    sampler, procs = build_sampler(temperature, top_p, top_k, min_p, repetition_penalty,
                                   repetition_context_size, logit_bias, sampler, logits_processors)
    prompt = encode_prompt(tokenizer, prompt)
    stops = [s for s in (stop or []) if s]
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    start_offset = cache[0].offset if cache and hasattr(cache[0], "offset") else 0
    room = context_limit(model) - start_offset - prompt.size
    if room <= 0:
        raise ValueError(f"the prompt ({prompt.size} tokens) does not fit the context window "
                         f"({context_limit(model)} tokens, {start_offset} already cached)")
    limit = room if max_tokens is None else min(max_tokens, room)
    length_reason = "length" if max_tokens is not None and max_tokens <= room else "context"

    detok = tokenizer.detokenizer
    emitted = 0
    tic = time.perf_counter()
    prompt_tps = ttft = 0.0
    token, logprobs, n = -1, None, 0

    def response(text, reason=None):
        elapsed = time.perf_counter() - tic
        return GenerationResponse(
            text=text, token=token, logprobs=logprobs, prompt_tokens=prompt.size, prompt_tps=prompt_tps,
            generation_tokens=n, generation_tps=n / elapsed if elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=reason, time_to_first_token=ttft)

    steps = generate_step(prompt, model, max_tokens=limit, sampler=sampler, logits_processors=procs,
                          prompt_cache=cache, prefill_step_size=prefill_step_size,
                          prompt_progress_callback=prompt_progress_callback)
    reason = None
    try:
        for token, logprobs in steps:
            if n == 0:
                ttft = time.perf_counter() - tic
                prompt_tps = prompt.size / ttft
                tic = time.perf_counter()
            n += 1
            if token in eos:
                reason = "stop"
                break
            detok.add_token(token)
            text = detok.text
            if stops:
                hits = [i for i in (text.find(s, max(emitted - len(s), 0)) for s in stops) if i >= 0]
                if hits:
                    yield response(text[emitted:min(hits)], "stop")
                    return
                safe = len(text) - _held_back(text, stops)
            else:
                safe = len(text)
            if n >= limit:
                reason = length_reason
                break
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            if safe > emitted:
                chunk, emitted = text[emitted:safe], safe
                yield response(chunk)
            else:
                yield response("")
        else:
            reason = reason or length_reason
    finally:
        steps.close()
    detok.finalize()
    text = detok.text
    if stops:
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            text, reason = text[:min(hits)], "stop"
    yield response(text[emitted:], reason)


def generate(model: nn.Module, tokenizer, prompt, max_tokens: Optional[int] = 256, verbose: bool = False,
             **kwargs) -> str:
    """Generate a whole completion and return its text."""
    parts = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        parts.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(f"\n[{last.finish_reason}] prompt: {last.prompt_tokens} tok, {last.prompt_tps:.1f} tok/s; "
              f"generation: {last.generation_tokens} tok, {last.generation_tps:.1f} tok/s; "
              f"peak memory {last.peak_memory:.2f} GB")
    return "".join(parts)
