"""Text generation: `generate_step` (tokens), `stream_generate` (text segments), `generate` (a string).

The loop follows mlx-lm's: a dedicated stream, chunked prefill that evaluates only the cache, the
last prompt token held back so the head runs on one position, and double-buffered decoding
(`mx.async_eval` of token n+1 before token n is read). On top of it: stop strings that never leak
into the text, a `finish_reason` that always says why it ended ("stop", "length", "context",
"cancelled"), cancellation through a `threading.Event` or by closing the generator, and
`max_tokens=None` for "until the end of the turn or the context window".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from qwen2_mlx.models.long_context import default_context_limit

from .kv_quant import KVQuantization, quantizer
from .prompt_cache import make_prompt_cache
from .proposers import LookupSettings, check_draft
from .responses import ContextOverflowError, GenerationResponse, GenerationStats, Reply
from .settings import DEFAULT_PREFILL_STEP_SIZE, GenerationSettings
from .speculative import SpeculativeStats, make_distribution, speculative_generate_step, split_cache

generation_stream = mx.new_thread_local_stream(mx.default_device())


def context_limit(model: nn.Module) -> int:
    """The longest sequence the model runs to: `load(max_context=)`, else its long-context method's default."""
    return getattr(model, "max_context", None) or default_context_limit(model.args)


def check_logit_bias(logit_bias, vocab_size: int) -> None:
    """Every biased id is a token of the model: MLX does not bounds-check the scatter that applies it."""
    for token, bias in (logit_bias or {}).items():
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias: token id {token!r} is outside the vocabulary (0..{vocab_size - 1})")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise ValueError(f"logit_bias: the bias of token {token} must be a finite number, not {bias!r}")


def check_prompt_ids(ids: mx.array, vocab_size: int) -> None:
    """Token ids given by the caller index the embedding table, which MLX does not bounds-check."""
    if ids.size and int(ids.max().item()) >= vocab_size:
        raise ValueError(f"prompt: token id {int(ids.max().item())} is outside the vocabulary (0..{vocab_size - 1})")


def build_sampler(settings: GenerationSettings, vocab_size: int, extra_processors: Sequence[Callable] = ()):
    """mlx-lm's sampler and logits processors from the settings (a given `sampler` wins)."""
    check_logit_bias(settings.logit_bias, vocab_size)
    sampler = settings.sampler
    if sampler is None:
        sampler = make_sampler(
            temp=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, min_p=settings.min_p
        )
    procs = list(settings.logits_processors or []) + list(extra_processors)
    procs += make_logits_processors(
        logit_bias=settings.logit_bias,
        repetition_penalty=settings.repetition_penalty,
        repetition_context_size=settings.repetition_context_size,
    )
    return sampler, procs


def _hint_length(cache: list, new_tokens: int) -> None:
    """DCA caches give every prompt key the temperature of the whole prompt: tell them its length."""
    for c in cache:
        if hasattr(c, "length_hint"):
            c.length_hint = c.offset + new_tokens


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
    draft_model: Optional[nn.Module] = None,
    num_draft_tokens: int = 3,
    lookup: Union[None, bool, dict, LookupSettings] = None,
    context_tokens: Sequence[int] = (),
    distribution: Optional[Callable] = None,
    speculative_stats: Optional[SpeculativeStats] = None,
    kv_bits: Any = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    memory_budget: Any = None,
) -> Generator[tuple, None, None]:
    """Yield (token, logprobs) pairs. `max_tokens=None` never stops by count.

    The cache ends up holding the prompt and every token yielded so far (never a token the caller
    has not seen), which is what lets a chat trim it back exactly.

    Speculative decoding (speculative.py) yields (token, logprobs, from_draft) triples, as mlx-lm's
    speculative_generate_step does: `lookup=True` (or LookupSettings) proposes continuations of
    n-grams from `context_tokens` (what `prompt_cache` already holds), the prompt and the reply;
    `draft_model` proposes `num_draft_tokens` tokens (then `prompt_cache`, if given, is mlx-lm's
    model-then-draft list). `distribution` (speculative.make_distribution) is what the sampler
    draws from, for the accept/resample rule at temperature > 0.

    `kv_bits` (with `kv_group_size`, `quantized_kv_start`: mlx-lm's names and rule) quantizes each
    layer's cache, in place in `prompt_cache`, once it holds `quantized_kv_start` tokens (kv_quant.py);
    `kv_bits="auto"` does it at 8 bits once the float cache would pass `memory_budget` (kv_budget.py).
    """
    if prompt.size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    quantize = quantizer(KVQuantization.make(kv_bits, kv_group_size, quantized_kv_start, model, memory_budget))
    lookup = LookupSettings.coerce(lookup)
    progress = prompt_progress_callback or (lambda *_: None)
    if draft_model is not None or lookup is not None:
        yield from _speculative(
            prompt,
            model,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=logits_processors,
            prompt_cache=prompt_cache,
            prefill_step_size=prefill_step_size,
            progress=progress,
            draft_model=draft_model,
            num_draft_tokens=num_draft_tokens,
            lookup=lookup,
            context_tokens=context_tokens,
            distribution=distribution,
            stats=speculative_stats,
            quantize=quantize,
        )
        return
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    yield from _decode(
        prompt, model, cache, sampler, logits_processors, max_tokens, prefill_step_size, progress, quantize
    )


def _decode(prompt, model, cache, sampler, logits_processors, max_tokens, prefill_step_size, progress, quantize):
    """generate_step's plain loop: prefill, then one token per forward, double-buffered."""
    total = prompt.size
    history = None  # tokens the logits processors see: prompt and generated tokens so far

    def step(tokens: mx.array):
        nonlocal history
        logits = model(tokens[None], cache=cache)[:, -1, :]
        quantize(cache)
        if logits_processors:
            history = tokens if history is None else mx.concatenate([history, tokens])
            for proc in logits_processors:
                logits = proc(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    _hint_length(cache, prompt.size)
    with mx.stream(generation_stream):
        # Prefill all but the last prompt token; the last one goes through the head in `step`.
        done = _prefill(model, prompt[:-1], cache, prefill_step_size, lambda d, _: progress(d, total), quantize)
        if logits_processors and done:
            history = prompt[:done]
        y, logprobs = step(prompt[done:])
        mx.async_eval(y, logprobs)

        # Decode: queue token n+1 before reading token n, so the device never waits on Python.
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


def _speculative(prompt, model, *, prompt_cache, prefill_step_size, progress, **kw):
    """generate_step's speculative branch: check the settings, set up the caches, run the loop."""
    draft_model, lookup = kw["draft_model"], kw["lookup"]
    if draft_model is not None and lookup is not None:
        raise ValueError("choose prompt lookup or a draft model, not both")
    if draft_model is not None:
        check_draft(model, draft_model)
        if not isinstance(kw["num_draft_tokens"], int) or kw["num_draft_tokens"] < 1:
            raise ValueError(f"num_draft_tokens must be a positive integer (got {kw['num_draft_tokens']!r})")
    if prompt_cache is None:
        prompt_cache = make_prompt_cache(model) + (make_prompt_cache(draft_model) if draft_model is not None else [])
    cache, draft_cache = split_cache(prompt_cache, model, draft_model)
    total = prompt.size
    _hint_length(prompt_cache, prompt.size)

    def prefill(m: nn.Module, tokens: mx.array, c: list) -> int:
        report = (lambda d, _: progress(d, total)) if m is model else (lambda *_: None)
        return _prefill(m, tokens, c, prefill_step_size, report, kw["quantize"])

    try:
        with mx.stream(generation_stream):
            yield from speculative_generate_step(
                prompt,
                model,
                cache,
                prefill=prefill,
                draft_cache=draft_cache,
                on_first=lambda: progress(total, total),
                **kw,
            )
    finally:
        if draft_cache is not None:  # layers quantized in the split lists go back to the caller's list
            prompt_cache[:] = cache + draft_cache


def _prefill(
    model: nn.Module,
    tokens: mx.array,
    cache: list,
    step_size: int,
    progress: Callable[[int, int], None],
    quantize: Callable[[list], None] = lambda cache: None,
) -> int:
    """Run `tokens` into the cache in chunks, evaluating only the cache (no head). Returns the count."""
    total, done = tokens.size, 0
    progress(0, total)
    while done < total:
        n = min(step_size, total - done)
        model(tokens[done : done + n][None], cache=cache)
        quantize(cache)
        mx.eval([c.state for c in cache])
        done += n
        progress(done, total)
        mx.clear_cache()
    return done


def prefill_prompt_cache(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    prompt_cache: Optional[list] = None,
    *,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    kv_bits: Any = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    memory_budget: Any = None,
) -> list:
    """Process a prompt (e.g. a long document) into a KV cache once, to reuse for many questions.

    Appends to `prompt_cache` when given (else a new cache) and returns it; it then holds every
    prompt token, so later calls pass only the new tokens with `prompt_cache=`. `kv_bits` and
    friends quantize it as generate_step does (pass the same settings when generating from it).
    """
    tokens = encode_prompt(tokenizer, prompt)
    if tokens.size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    quantize = quantizer(KVQuantization.make(kv_bits, kv_group_size, quantized_kv_start, model, memory_budget))
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    held = getattr(cache[0], "offset", 0) if cache else 0
    if held + tokens.size > context_limit(model):
        raise ContextOverflowError(
            f"the prompt ({tokens.size} tokens, {held} more already cached) does not "
            f"fit the context window of {context_limit(model)} tokens"
        )
    _hint_length(cache, tokens.size)
    with mx.stream(generation_stream):
        _prefill(model, tokens, cache, prefill_step_size, prompt_progress_callback or (lambda *_: None), quantize)
    return cache


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class StopStringFilter:
    """Detokenizes a token stream and releases only text that cannot be part of a stop string.

    `add(token)` and `finish()` return the newly released text; once a stop string appears,
    `stopped` is set and the text ends right before it.
    """

    def __init__(self, detokenizer, stop: Optional[Iterable[str]] = None):
        self.detokenizer = detokenizer
        if isinstance(stop, str):
            stop = [stop]
        self.stops = [s for s in (stop or []) if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.emitted = 0
        self.stopped = False

    def _release(self, final: bool) -> str:
        text = self.detokenizer.text
        if self.stops:
            start = max(self.emitted - self.longest, 0)
            hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                end = max(min(hits), self.emitted)
                chunk, self.emitted = text[self.emitted : end], end
                return chunk
            safe = len(text) if final else len(text) - _held_back(text, self.stops)
        else:
            safe = len(text)
        if safe <= self.emitted:
            return ""
        chunk, self.emitted = text[self.emitted : safe], safe
        return chunk

    def add(self, token: int) -> str:
        self.detokenizer.add_token(token)
        return self._release(final=False)

    def finish(self) -> str:
        self.detokenizer.finalize()
        return self._release(final=True)


def encode_prompt(tokenizer, prompt: Union[str, Sequence[int], mx.array]) -> mx.array:
    """Token ids of a prompt: a string is encoded as is (no special tokens are added)."""
    if isinstance(prompt, mx.array):
        return prompt.reshape(-1)
    if isinstance(prompt, str):
        return mx.array(tokenizer.encode(prompt, add_special_tokens=False), dtype=mx.uint32)
    return mx.array(list(prompt), dtype=mx.uint32)


def as_wrapper(tokenizer):
    """mlx-lm's TokenizerWrapper around `tokenizer` (it brings the streaming detokenizer)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


def fresh_detokenizer(tokenizer):
    detok = as_wrapper(tokenizer).detokenizer
    detok.reset()
    return detok


class _Cancelled(Exception):
    """Raised from the prefill progress callback to stop a long prefill early."""


_DEFAULT: Any = object()  # "not given": the settings' own value holds


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    max_tokens: Optional[int] = _DEFAULT,
    *,
    settings: Optional[GenerationSettings] = None,
    cancel: Optional[Any] = None,
    prompt_cache: Optional[list] = None,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    context_tokens: Sequence[int] = (),
    **kwargs: Any,
) -> Generator[GenerationResponse, None, None]:
    """Stream a completion as GenerationResponse segments; the last one carries `finish_reason`.

    `settings` (a GenerationSettings, settings.py) says how to generate; keyword settings with
    its field names (mlx-lm's: `temperature=`/`temp=`, `top_p=`, `max_tokens=`, `stop=`, ...) go on
    top of it. `prompt` is a string (encoded as is, no special tokens added) or token ids; with a
    `prompt_cache`, only the tokens the cache does not hold yet. `stop` strings end generation
    and never appear in the text. `cancel` is anything with `is_set()` (a `threading.Event`);
    setting it from another thread ends the stream with "cancelled" (checked after every token
    and between prefill chunks). `max_tokens=None` (or a negative value, as in mlx-lm) runs until
    the end of the turn or the context window ("context"); `max_context` narrows that window
    below the model's. Raises ContextOverflowError when the prompt itself does not fit.

    Speculative decoding, exact (see speculative.py): `lookup=True` for prompt lookup, `draft_model=`
    for a draft model of the same tokenizer; `context_tokens` are the ids `prompt_cache` already
    holds, for prompt lookup to search. Responses then say `from_draft` per token and count
    proposals, acceptances and forwards. `kv_bits` (4 and 8 are the useful ones) quantizes the KV
    cache as mlx-lm does, DCA layers included. `json_schema` keeps the reply inside a JSON schema
    while sampling (structured.py, needs the `serve` extra's llguidance).
    """
    if max_tokens is not _DEFAULT:
        kwargs["max_tokens"] = max_tokens
    run = prepare_run(
        model, tokenizer, prompt, GenerationSettings.build(settings, **kwargs), prompt_cache, cancel,
        prompt_progress_callback, context_tokens,
    )  # fmt: skip
    yield from token_loop(run, cancel)


@dataclass
class PreparedRun:
    """A generation ready to run: the prompt's ids, the token steps and how the text ends."""

    prompt: mx.array
    steps: Generator
    text_filter: StopStringFilter
    eos: set
    limit: int  # the most tokens: max_tokens, or what the context window leaves
    length_reason: str  # "length" when max_tokens is the limit, else "context"
    spec: Optional[SpeculativeStats]


def prepare_run(
    model, tokenizer, prompt, s: GenerationSettings, cache, cancel, progress, context_tokens
) -> PreparedRun:
    """Check what a run needs, build its sampler and processors and the (not yet started) token steps."""
    KVQuantization.make(**s.kv, model=model)  # before any work
    if s.seed is not None:
        mx.random.seed(s.seed)
    extra = []
    if s.json_schema is not None and s.json_schema is not False:
        from .structured import json_schema_processor

        schema = None if s.json_schema is True else s.json_schema
        extra.append(json_schema_processor(tokenizer, schema, model.args.vocab_size))
    if s.draft_model is not None:
        check_draft(model, s.draft_model, len(as_wrapper(tokenizer)._tokenizer))
    # Known settings give the accept/resample rule the distribution; a custom sampler does not.
    known = s.sampler is None and s.temperature > 0
    distribution = make_distribution(s.temperature, s.top_p, s.top_k, s.min_p) if known else None
    spec = SpeculativeStats() if s.speculative else None
    sampler, procs = build_sampler(s, model.args.vocab_size, extra)
    ids = encode_prompt(tokenizer, prompt)
    if ids.size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    check_prompt_ids(ids, model.args.vocab_size)
    if cache is None:  # with a draft model, mlx-lm's layout: the model's layers, then the draft's
        cache = make_prompt_cache(model) + (make_prompt_cache(s.draft_model) if s.draft_model is not None else [])
    start_offset = getattr(cache[0], "offset", 0) if cache else 0
    window = min(s.max_context, context_limit(model)) if s.max_context else context_limit(model)
    room = window - start_offset - ids.size
    if room <= 0:
        raise ContextOverflowError(
            f"the prompt ({ids.size} tokens, {start_offset} more already cached) does not fit "
            f"the context window of {window} tokens"
        )
    limit = room if s.max_tokens is None else min(s.max_tokens, room)
    steps = generate_step(
        ids,
        model,
        max_tokens=limit,
        sampler=sampler,
        logits_processors=procs,
        prompt_cache=cache,
        prefill_step_size=s.prefill_step_size,
        prompt_progress_callback=_cancellable(cancel, progress),
        draft_model=s.draft_model,
        num_draft_tokens=s.num_draft_tokens,
        lookup=s.lookup_settings,
        context_tokens=context_tokens,
        distribution=distribution,
        speculative_stats=spec,
        **s.kv,
    )
    length_reason = "length" if s.max_tokens is not None and s.max_tokens <= room else "context"
    eos = set(getattr(as_wrapper(tokenizer), "eos_token_ids", None) or [])
    return PreparedRun(
        ids, steps, StopStringFilter(fresh_detokenizer(tokenizer), s.stop), eos, limit, length_reason, spec
    )


def _cancellable(cancel, callback) -> Callable[[int, int], None]:
    """The prefill progress callback, which also stops a long prefill once `cancel` is set."""

    def progress(done: int, total: int) -> None:
        if cancel is not None and done < total and cancel.is_set():
            raise _Cancelled
        if callback is not None:
            callback(done, total)

    return progress


@dataclass
class _Tally:
    """A run's counts and clocks, and the responses built from them."""

    prompt_tokens: int
    spec: Optional[SpeculativeStats]
    tic: float = field(default_factory=time.perf_counter)
    prompt_tps: float = 0.0
    ttft: float = 0.0
    token: int = -1
    n: int = 0
    from_draft: bool = False
    accepted: int = 0

    def take(self, step: tuple) -> None:
        self.token, self.from_draft = step[0], len(step) > 2 and step[2]
        self.accepted += self.from_draft
        if self.n == 0:  # the first token: the prompt's time ends, the generation's starts
            self.ttft = time.perf_counter() - self.tic
            self.prompt_tps = self.prompt_tokens / self.ttft if self.ttft > 0 else 0.0
            self.tic = time.perf_counter()
        self.n += 1

    def response(self, text: str, reason: Optional[str] = None) -> GenerationResponse:
        elapsed, n = time.perf_counter() - self.tic, self.n
        return GenerationResponse(
            text=text,
            token=self.token,
            logprobs=None,
            prompt_tokens=self.prompt_tokens,
            prompt_tps=self.prompt_tps,
            generation_tokens=n,
            generation_tps=n / elapsed if n and elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=reason,
            from_draft=self.from_draft,
            time_to_first_token=self.ttft,
            proposed_tokens=self.spec.proposed if self.spec else 0,
            accepted_tokens=self.accepted,
            forward_passes=self.spec.forwards if self.spec else 0,
        )


def token_loop(run: PreparedRun, cancel: Optional[Any] = None) -> Generator[GenerationResponse, None, None]:
    """Run the steps of a prepared run into text segments, ending with the one that says why it ended."""
    tally = _Tally(int(run.prompt.size), run.spec)
    text_filter, reason, pending = run.text_filter, None, ""
    try:
        for step in run.steps:
            tally.take(step)
            if tally.token in run.eos:
                reason = "stop"
                break
            chunk = text_filter.add(tally.token)
            if text_filter.stopped:
                yield tally.response(chunk, "stop")
                return
            if tally.n >= run.limit or (cancel is not None and cancel.is_set()):
                reason, pending = (run.length_reason if tally.n >= run.limit else "cancelled"), chunk
                break
            yield tally.response(chunk)
    except _Cancelled:
        reason = "cancelled"
    finally:
        run.steps.close()
    chunk = pending + text_filter.finish()
    if text_filter.stopped:
        reason = "stop"
    yield tally.response(chunk, reason or run.length_reason)


def generate(
    model: nn.Module, tokenizer, prompt, max_tokens: Optional[int] = _DEFAULT, verbose: bool = False, **kwargs
) -> Reply:
    """Generate a whole completion; returns a `Reply` (a str with `.finish_reason` and `.stats`).

    Settings as `stream_generate` takes them (`settings=` and keyword settings).
    """
    parts = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        parts.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(
            f"\n[{last.finish_reason}] prompt: {last.prompt_tokens} tok, {last.prompt_tps:.1f} tok/s; "
            f"generation: {last.generation_tokens} tok, {last.generation_tps:.1f} tok/s; "
            f"peak memory {last.peak_memory:.2f} GB"
        )
    return Reply("".join(parts), last.finish_reason if last else None, GenerationStats.from_response(last))
