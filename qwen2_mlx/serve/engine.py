"""The engine: one thread owns the model and runs every request, continuously batched where it can.

Plain-attention models run as a continuous batch on mlx-lm's `BatchGenerator` (our models follow mlx-lm's
protocol, so its `BatchKVCache` drives them): a request joins between decode steps, a finished or cancelled
one leaves, and its slot is refilled from the waiting ones. What cannot batch (speculative decoding, a
quantized KV cache) runs one request at a time through `stream_generate`, in arrival order. Under Dual Chunk
Attention (on by default) a request batches while it stays within `chunk_size + 1` tokens, where DCA is
plain attention; one that reaches that edge goes on alone on DCA caches, its batch cache converted exactly
(`to_dca_cache`), while the batch waits. Either way each request starts from the longest cached prefix of
its tokens (mlx-lm's `LRUPromptCache`: several conversations, bounded in entries and bytes, least recently
used evicted), and its KV cache goes back there when it ends, however it ends, holding exactly the tokens it
was fed, so a follow-up turn prefills only its new tokens.

`submit` refuses work past `max_concurrency + queue_size` requests (the app answers 429).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

from qwen2_mlx.generation.generate import (
    StopStringFilter,
    as_wrapper,
    context_limit,
    fresh_detokenizer,
    generation_stream,
    stream_generate,
)
from qwen2_mlx.generation.prompt_cache import make_prompt_cache, to_dca_cache, to_plain_cache
from qwen2_mlx.generation.settings import GenerationSettings
from qwen2_mlx.models.dca import DCAGeometry

from .protocol import APIError, DoneEvent, ErrorEvent, Job, Sampling, TokenEvent

log = logging.getLogger("qwen2_mlx.serve")


class QueueFull(APIError):
    def __init__(self, limit: int):
        super().__init__(429, f"the server is busy: {limit} requests are running or waiting", "rate_limit_error")


def make_request_sampler(s: Sampling):
    """mlx-lm's sampler; with a seed, one that draws from its own key, so a seeded request repeats
    exactly whatever else shares its batch (mlx-lm's server refuses to batch seeded requests)."""
    if s.temperature <= 0 or s.seed is None:
        return make_sampler(temp=s.temperature, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k)
    key = [mx.random.key(s.seed)]

    def sample(logprobs: mx.array) -> mx.array:
        if s.top_k > 0:
            logprobs = apply_top_k(logprobs, s.top_k)
        if 0 < s.top_p < 1:
            logprobs = apply_top_p(logprobs, s.top_p)
        if s.min_p > 0:
            logprobs = apply_min_p(logprobs, s.min_p)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * (1 / s.temperature), key=sub)

    return sample


class Guarded:
    """A request's sampler or logits processor whose exception ends that request alone.

    mlx-lm's batch step calls every row's sampler and processors in turn; one raising would fail
    the whole step, and with it every request in the batch. Here the failing row records why on
    its job and gets a stand-in for this step (its logits unchanged, or the greedy token), so the
    other rows' step is the one they would have had alone; the engine then removes the row.
    """

    def __init__(self, fn, job: Job, sampler: bool):
        self.fn, self.job, self.sampler = fn, job, sampler

    def __call__(self, *args):
        if self.job.failure is None:
            try:
                return self.fn(*args)
            except Exception as e:  # noqa: BLE001 - whatever it was, it ends this request only
                self.job.failure = request_failure(e)
        return mx.argmax(args[0], axis=-1) if self.sampler else args[1]


def request_failure(e: Exception) -> APIError:
    """What a client is told when its own request fails while generating (no internal text)."""
    from qwen2_mlx.generation.structured import StructuredOutputError

    if isinstance(e, StructuredOutputError):
        log.info("a request's grammar failed: %s", e)
        return APIError(400, "response_format: the schema cannot be followed any further (the grammar failed)")
    log.warning("a request failed while generating", exc_info=e)
    return APIError(500, "generation failed for this request; the server goes on", "server_error")


class _Active:
    """A running request: its job, text filter, and what it has produced."""

    def __init__(self, job: Job, tokenizer):
        self.job, self.tok = job, tokenizer
        self.filter = StopStringFilter(fresh_detokenizer(tokenizer), job.stop)
        self.tokens: list[int] = []
        self.started = time.perf_counter()
        self.first_token: Optional[float] = None
        self.text = ""  # the serial path's reply so far (stream_generate filters its stop strings)
        self.handoff = False  # batched up to DCA's plain edge, with budget left past it

    def stop_sequence(self) -> Optional[str]:
        """Which stop string ended the reply (Anthropic reports it)."""
        if self.text:
            full = self.tok.decode(self.tokens) if self.job.stop else ""
            return next((s for s in self.job.stop if full.startswith(s, len(self.text))), None)
        if not self.filter.stopped:
            return None
        text = self.filter.detokenizer.text
        return next((s for s in self.filter.stops if text.startswith(s, self.filter.emitted)), None)


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_name: str = "model",
        max_concurrency: int = 8,
        queue_size: int = 32,
        cache_entries: int = 10,
        cache_bytes: int = 4 << 30,
        prefill_step_size: int = 2048,
        default_max_tokens: Optional[int] = None,
        lookup=None,
        draft_model=None,
        num_draft_tokens: int = 3,
        kv: Optional[dict] = None,
        disk_cache=None,
    ):
        self.model, self.tokenizer = model, as_wrapper(tokenizer)
        self.model_name = model_name
        self.max_concurrency, self.queue_size = max_concurrency, queue_size
        self.prefill_step_size = prefill_step_size
        self.default_max_tokens = default_max_tokens
        self.lookup, self.draft_model, self.num_draft_tokens = lookup, draft_model, num_draft_tokens
        # KV-cache quantization (kv_bits, kv_group_size, quantized_kv_start): stream_generate's settings
        self.kv = {k: v for k, v in (kv or {}).items() if v is not None} if (kv or {}).get("kv_bits") else {}
        # What every request shares; each one's sampling and stopping go on top (`_settings`).
        self.settings = GenerationSettings.build(
            prefill_step_size=prefill_step_size,
            draft_model=draft_model,
            num_draft_tokens=num_draft_tokens,
            lookup=lookup,
            **self.kv,
        )
        self.window = context_limit(model)
        self.eos = set(self.tokenizer.eos_token_ids or [])
        dca = getattr(model.args, "dual_chunk_attention_config", None)
        self.dca = DCAGeometry.from_config(dca) if dca is not None else None
        plain_ok = self.dca is None or self.dca.plain_exact  # DCA batches only where it is plain attention
        self.batching = plain_ok and draft_model is None and not lookup and not self.kv
        self.cache = LRUPromptCache(max_size=cache_entries, max_bytes=cache_bytes)
        self.disk = disk_cache  # disk_cache.DiskPrefixCache: prefixes that outlive a restart, or None
        self._incoming: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not finished
        self._running = 0
        self._reasons: dict = {}  # finished requests by finish reason, for /health
        self._held: set = set()  # jobs the engine thread has taken and not yet answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="qwen2-serve-engine", daemon=True)
        self.healthy = True
        self.restarts = 0  # times the engine loop failed and was started again

    # --- the HTTP side --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._incoming.put(None)
        self._thread.join(timeout=30)

    def status(self) -> dict:
        with self._lock:
            return {
                "running": self._running,
                "waiting": self._pending - self._running,
                "cached_sequences": len(self.cache),
                "cached_bytes": self.cache.nbytes,
                "batching": self.batching,
                "finished": dict(self._reasons),
                "healthy": self.healthy and self._thread.is_alive(),
                "restarts": self.restarts,
            }

    def check_prompt(self, n: int, max_tokens: Optional[int]) -> Optional[int]:
        """The completion budget for an n-token prompt; APIError when the prompt does not fit."""
        if n == 0:
            raise APIError(400, "the prompt is empty")
        if n >= self.window:
            raise APIError(
                400,
                f"the prompt is {n} tokens long, and the model's context window is {self.window} tokens "
                f"(at least one token must be left to generate); shorten the conversation",
                code="context_length_exceeded",
            )
        room = self.window - n
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        return room if max_tokens is None else min(max_tokens, room)

    def preload(self, tokens: list, cache) -> bool:
        """Put a saved conversation's cache (a chat file's) into the prefix cache; False if there is none."""
        if cache is None or not tokens or any(t < 0 for t in tokens):
            return False
        mx.eval([c.state for c in cache])  # loaded on this thread: nothing may stay pending on its streams
        self._keep(list(tokens), cache)
        return True

    def submit(self, job: Job) -> None:
        if not (self.healthy and self._thread.is_alive()):
            raise APIError(503, "the generation thread has stopped; restart the server", "server_error")
        with self._lock:
            if self._pending >= self.max_concurrency + self.queue_size:
                raise QueueFull(self.max_concurrency + self.queue_size)
            self._pending += 1
        self._incoming.put(job)

    # --- the engine thread ------------------------------------------------------------------------
    def _main(self) -> None:
        """Run the loop; should it ever fail, fail the requests it held and start it again."""
        while not self._stop.is_set():
            try:
                with mx.stream(generation_stream):
                    (self._batch_loop if self.batching else self._serial_loop)()
                return
            except Exception:
                self.healthy = False  # /health says so until the loop runs again
                log.exception("the engine loop failed; restarting it")
                self._fail_held(APIError(500, "the generation thread failed and was restarted", "server_error"))
                self.restarts += 1
                self.healthy = True

    def _fail_held(self, error: APIError) -> None:
        """Answer every job the loop had taken (running or waiting in its list) with `error`."""
        held, self._held = list(self._held), set()
        for job in held:
            job.emit(ErrorEvent(error))
        with self._lock:
            self._pending -= len(held)
            self._running = 0

    def _take(self, job: Job) -> None:
        with self._lock:
            self._running += 1
        self._held.add(job)

    def _finished(self, job: Job, reason: str, active: Optional[_Active] = None) -> None:
        info = {
            "cached_tokens": job.cached_tokens,
            "completion_tokens": job.generated,
            "prompt_tokens": len(job.prompt),
        }
        if active is not None:
            info["stop_sequence"] = active.stop_sequence()
            info["ttft"] = (active.first_token or time.perf_counter()) - active.started
        job.emit(DoneEvent(reason, info))
        self._release(job, reason)

    def _fail(self, job: Job, error: APIError) -> None:
        job.emit(ErrorEvent(error))
        self._release(job, "error")

    def _release(self, job: Job, reason: str) -> None:
        self._held.discard(job)
        with self._lock:
            self._reasons[reason] = self._reasons.get(reason, 0) + 1
            self._pending -= 1
            self._running -= 1

    def _fetch(self, prompt: list[int]):
        """The cache of the longest cached prefix and the tokens left to prefill (at least one)."""
        cache, rest = self.cache.fetch_nearest_cache(self.model_name, prompt)
        if self.disk is not None and self.disk.load_into(self.cache, self.model_name, prompt, len(prompt) - len(rest)):
            cache, rest = self.cache.fetch_nearest_cache(self.model_name, prompt)
        if cache is not None and not rest:  # the whole prompt is cached: recompute its last token
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            else:
                cache, rest = None, prompt
        return cache, list(rest)

    def _keep(self, tokens: list[int], cache) -> None:
        """Store a finished request's cache under the tokens it holds."""
        if cache is None or not tokens:
            return
        held = getattr(cache[0], "offset", len(tokens))
        if held < len(tokens):
            tokens = tokens[:held]
        elif held > len(tokens):
            if not can_trim_prompt_cache(cache):
                return
            trim_prompt_cache(cache, held - len(tokens))
        self.cache.insert_cache(self.model_name, list(tokens), cache)
        if self.disk is not None:
            self.disk.keep(list(tokens), cache)

    def _token_event(self, a: _Active, token: int, logprobs, text: str) -> None:
        entry = None
        if a.job.logprobs and logprobs is not None:
            entry = {"token": self.tokenizer.decode([token]), "logprob": logprobs[token].item(), "top": []}
            k = a.job.top_logprobs
            if k:
                top = mx.argpartition(-logprobs, k - 1)[:k]
                vals = logprobs[top]
                order = mx.argsort(-vals)
                entry["top"] = [
                    (self.tokenizer.decode([t]), v) for t, v in zip(top[order].tolist(), vals[order].tolist())
                ]
        if text or entry:
            a.job.emit(TokenEvent(text, token, entry))

    # Continuous batch ------------------------------------------------------------------------------
    def _new_batch(self) -> BatchGenerator:
        return BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in sorted(self.eos)],
            completion_batch_size=self.max_concurrency,
            prefill_batch_size=min(self.max_concurrency, 8),
            prefill_step_size=self.prefill_step_size,
            stream=generation_stream,
        )

    def _batch_loop(self) -> None:
        gen = self._new_batch()
        active: dict[int, _Active] = {}
        waiting: list[Job] = []
        while not self._stop.is_set():
            if not self._receive(waiting, block=not active and not waiting):
                return
            for job in [j for j in waiting if j.cancel.is_set()]:  # gone before their turn came
                waiting.remove(job)
                self._take(job)
                self._finished(job, "cancelled")
            # Fill free slots (the generator would queue them too, but a waiting request's cache
            # is fetched only when it starts, so it sees what the requests before it left).
            while waiting and len(active) < self.max_concurrency:
                self._start(gen, active, waiting.pop(0))
            gone = [uid for uid, a in active.items() if a.job.cancel.is_set()]
            if gone:
                self._remove(gen, active, gone, "cancelled")
            if active:
                gen = self._step(gen, active)

    def _receive(self, waiting: list, block: bool) -> bool:
        """Move submitted jobs to `waiting` (waiting a moment for one when idle); False on close."""
        try:
            while True:
                job = self._incoming.get(timeout=0.1) if block else self._incoming.get_nowait()
                block = False
                if job is None:
                    return False
                self._held.add(job)
                waiting.append(job)
        except queue.Empty:
            return True

    def _start(self, gen: BatchGenerator, active: dict, job: Job) -> None:
        """Insert a job into the batch; anything failing here fails this job alone."""
        self._take(job)
        if job.cancel.is_set():
            self._finished(job, "cancelled")
            return
        cap = self._batch_room(job)
        if cap < 1:  # past DCA's plain range from the start: alone, while the batch waits
            self._run_guarded(job)
            return
        try:
            cache, rest = self._fetch(job.prompt)
            cache = to_plain_cache(cache, self.model) if cache is not None else None
            job.cached_tokens = len(job.prompt) - len(rest)
            (uid,) = gen.insert(
                [rest],
                max_tokens=[min(job.max_tokens, cap)],
                caches=[cache],
                all_tokens=[job.prompt[: job.cached_tokens]],
                samplers=[Guarded(make_request_sampler(job.sampling), job, sampler=True)],
                logits_processors=[[Guarded(job.grammar, job, sampler=False)] if job.grammar is not None else []],
            )
        except Exception as e:  # noqa: BLE001
            self._fail(job, request_failure(e))
            return
        active[uid] = _Active(job, self.tokenizer)
        active[uid].handoff = job.max_tokens > cap

    def _step(self, gen: BatchGenerator, active: dict) -> BatchGenerator:
        """One decode step of the batch; the generator to go on with (a new one after a failed step)."""
        try:
            _, responses = gen.next()
        except Exception:  # a failed step fails the requests in it; the server stays up
            log.exception("a batch step failed")
            for a in active.values():
                self._fail(a.job, APIError(500, "generation failed in a batch step; retry the request", "server_error"))
            active.clear()
            return self._new_batch()
        ours = []  # rows our stop strings ended (the generator only knows token stops)
        for r in responses:
            a = active.get(r.uid)
            if a is None:
                continue
            edge = r.finish_reason == "length" and a.handoff  # DCA's plain edge, budget left
            ended = self._respond(a, r, None if edge else r.finish_reason)
            if edge and a.job.failure is not None:
                del active[r.uid]
                self._fail(a.job, a.job.failure)
            elif edge and not ended:
                del active[r.uid]  # on alone, exactly
                self._continue_alone(a, list(r.all_tokens), r.prompt_cache)
            elif ended or edge:
                if r.finish_reason is not None:
                    self._keep(r.all_tokens, r.prompt_cache)
                    del active[r.uid]
                    self._finished(a.job, "stop" if a.filter.stopped else r.finish_reason, a)
                else:
                    ours.append(r.uid)
        if ours:
            self._remove(gen, active, ours, "stop")
        failed = [uid for uid, a in active.items() if a.job.failure is not None]
        if failed:  # their sampler or grammar failed while this step was computed
            gen.remove(failed)
            for uid in failed:
                a = active.pop(uid)
                self._fail(a.job, a.job.failure)
        return gen

    def _respond(self, a: _Active, r, finish_reason: Optional[str]) -> bool:
        """Hand one row's token to its request; True when the request ends with it."""
        if a.first_token is None:
            a.first_token = time.perf_counter()
        return self._emit(a, r.token, r.logprobs, finish_reason) is not None

    def _emit(self, a: _Active, token: int, logprobs, finish_reason: Optional[str]) -> Optional[str]:
        """One generated token through the stop-string filter to the client; the finish reason, if it ends."""
        a.job.generated += 1
        if finish_reason == "stop" and token in self.eos:
            text, reason = a.filter.finish(), "stop"
        else:
            text = a.filter.add(token)
            reason = "stop" if a.filter.stopped else finish_reason
            if reason is not None and not a.filter.stopped:
                text += a.filter.finish()
        self._token_event(a, token, logprobs if token not in self.eos else None, text)
        return reason

    def _batch_room(self, job: Job) -> int:
        """How many tokens a job may generate in the batch: all, or up to DCA's plain edge (< 1: none).

        A grammar's matcher counts the tokens it has seen, so such a job never changes path mid-reply."""
        if self.dca is None:
            return job.max_tokens
        room = self.dca.plain_limit - len(job.prompt)
        return room if job.grammar is None or job.max_tokens <= room else 0

    def _continue_alone(self, a: _Active, tokens: list, cache) -> None:
        """Go on with a batched request past DCA's plain edge through `stream_generate` on DCA caches.

        The batch cache holds every token the reply has so far (the last one was fed ahead); it gives
        that one back and feeds it again, so the next logits are the DCA model's own."""
        job = a.job
        trim_prompt_cache(cache, 1)
        cache, reason = to_dca_cache(cache, self.model), "length"
        s = job.sampling
        try:
            for resp in stream_generate(
                self.model,
                self.tokenizer,
                tokens[-1:],
                settings=self.settings.replace(
                    max_tokens=job.max_tokens - job.generated,
                    sampler=make_request_sampler(s),
                    draft_model=None,
                    lookup=None,
                ),
                cancel=job.cancel,
                prompt_cache=cache,
                context_tokens=tokens[:-1],
            ):
                if resp.token < 0:
                    reason = resp.finish_reason or reason
                    break
                tokens.append(resp.token)
                reason = self._emit(a, resp.token, resp.logprobs, resp.finish_reason)
                if reason is not None:
                    break
        except Exception as e:  # noqa: BLE001 - a request's failure ends that request alone
            self._fail(job, job.failure or request_failure(e))
            return
        self._keep(tokens, cache)
        self._finished(job, {"context": "length", None: "length"}.get(reason, reason), a)

    def _remove(self, gen: BatchGenerator, active: dict, uids: list, reason: str) -> None:
        caches = gen.remove(uids, return_prompt_caches=True)
        for uid in uids:
            a = active.pop(uid)
            if uid in caches:
                cache, tokens = caches[uid]
                self._keep(list(tokens), cache)
            self._finished(a.job, reason, a)

    # One at a time ---------------------------------------------------------------------------------
    def _serial_loop(self) -> None:
        while not self._stop.is_set():
            job = self._incoming.get()
            if job is None:
                return
            self._take(job)
            if job.cancel.is_set():
                self._finished(job, "cancelled")
                continue
            self._run_guarded(job)

    def _run_guarded(self, job: Job) -> None:
        """`_run_one`, with a failure answered as the request's error (the server stays up)."""
        try:
            self._run_one(job)
        except Exception as e:  # noqa: BLE001 - a request's failure ends that request alone
            self._fail(job, job.failure or request_failure(e))

    def _run_one(self, job: Job) -> None:
        cache, rest = self._fetch(job.prompt)
        cache = to_dca_cache(cache, self.model) if cache is not None else None  # a batch's plain cache
        job.cached_tokens = len(job.prompt) - len(rest)
        if cache is None:
            cache = make_prompt_cache(self.model)
            if self.draft_model is not None:
                cache += make_prompt_cache(self.draft_model)
        a = _Active(job, self.tokenizer)
        s = job.sampling
        reason = "stop"
        seed = s.seed if s.temperature > 0 else None
        for resp in stream_generate(
            self.model,
            self.tokenizer,
            rest,
            settings=self.settings.replace(
                max_tokens=job.max_tokens,
                sampler=make_request_sampler(Sampling(s.temperature, s.top_p, s.top_k, s.min_p)),
                seed=seed,
                logits_processors=[job.grammar] if job.grammar is not None else None,
                stop=job.stop,
            ),
            cancel=job.cancel,
            prompt_cache=cache,
            context_tokens=job.prompt[: job.cached_tokens],
        ):
            if a.first_token is None:
                a.first_token = time.perf_counter()
            job.generated = resp.generation_tokens
            if resp.token >= 0 and resp.token not in self.eos:
                a.tokens.append(resp.token)
            a.text += resp.text
            lp = resp.logprobs if resp.token >= 0 and resp.token not in self.eos else None
            self._token_event(a, resp.token, lp, resp.text)
            if resp.finish_reason is not None:
                reason = resp.finish_reason
        # The cache holds the prompt and the tokens fed back so far; _keep trims to what it can name.
        fed = job.prompt + a.tokens + ([t for t in [resp.token] if t in self.eos] if job.generated else [])
        self._keep(fed, cache)
        self._finished(job, {"context": "length"}.get(reason, reason), a)
