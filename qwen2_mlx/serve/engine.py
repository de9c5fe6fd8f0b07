"""The engine: one thread owns the model and runs every request, continuously batched where it can.

Plain-attention models run as a continuous batch on mlx-lm's `BatchGenerator` (our models follow
mlx-lm's protocol, so its `BatchKVCache` drives them): a request joins between decode steps, a
finished or cancelled one leaves, and its slot is refilled from the waiting ones. What cannot batch
(Dual Chunk Attention, speculative decoding, a quantized KV cache) runs one request at a time through `stream_generate`,
in arrival order. Either way each request starts from the longest cached prefix of its tokens
(mlx-lm's `LRUPromptCache`: several conversations, bounded in entries and bytes, least recently
used evicted), and its KV cache goes back there when it ends, however it ends, holding exactly the
tokens it was fed, so a follow-up turn prefills only its new tokens.

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
from qwen2_mlx.generation.prompt_cache import make_prompt_cache

from .protocol import APIError, Job, Sampling

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


class _Active:
    """A running request: its job, text filter, and what it has produced."""

    def __init__(self, job: Job, tokenizer):
        self.job, self.tok = job, tokenizer
        self.filter = StopStringFilter(fresh_detokenizer(tokenizer), job.stop)
        self.tokens: list[int] = []
        self.started = time.perf_counter()
        self.first_token: Optional[float] = None
        self.text = ""  # the serial path's reply so far (stream_generate filters its stop strings)

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
        self.window = context_limit(model)
        self.eos = set(self.tokenizer.eos_token_ids or [])
        dca = getattr(model.args, "dual_chunk_attention_config", None) is not None
        self.batching = not dca and draft_model is None and not lookup and not self.kv
        self.cache = LRUPromptCache(max_size=cache_entries, max_bytes=cache_bytes)
        self.disk = disk_cache  # disk_cache.DiskPrefixCache: prefixes that outlive a restart, or None
        self._incoming: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not finished
        self._running = 0
        self._reasons: dict = {}  # finished requests by finish reason, for /health
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="qwen2-serve-engine", daemon=True)
        self.healthy = True

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
        try:
            with mx.stream(generation_stream):
                (self._batch_loop if self.batching else self._serial_loop)()
        except Exception:
            log.exception("the engine thread died")
            self.healthy = False

    def _finished(self, job: Job, reason: str, active: Optional[_Active] = None) -> None:
        info = {
            "cached_tokens": job.cached_tokens,
            "completion_tokens": job.generated,
            "prompt_tokens": len(job.prompt),
        }
        if active is not None:
            info["stop_sequence"] = active.stop_sequence()
            info["ttft"] = (active.first_token or time.perf_counter()) - active.started
        job.emit("done", reason, info)
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
            a.job.emit("token", text, token, entry)

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
            block = not active and not waiting
            try:
                while True:
                    job = self._incoming.get(timeout=0.1) if block else self._incoming.get_nowait()
                    block = False
                    if job is None:
                        return
                    waiting.append(job)
            except queue.Empty:
                pass
            for job in [j for j in waiting if j.cancel.is_set()]:  # gone before their turn came
                waiting.remove(job)
                with self._lock:
                    self._running += 1
                self._finished(job, "cancelled")
            # Fill free slots (the generator would queue them too, but a waiting request's cache
            # is fetched only when it starts, so it sees what the requests before it left).
            while waiting and len(active) < self.max_concurrency:
                job = waiting.pop(0)
                with self._lock:
                    self._running += 1
                if job.cancel.is_set():
                    self._finished(job, "cancelled")
                    continue
                cache, rest = self._fetch(job.prompt)
                job.cached_tokens = len(job.prompt) - len(rest)
                (uid,) = gen.insert(
                    [rest],
                    max_tokens=[job.max_tokens],
                    caches=[cache],
                    all_tokens=[job.prompt[: job.cached_tokens]],
                    samplers=[make_request_sampler(job.sampling)],
                    logits_processors=[[job.grammar] if job.grammar is not None else []],
                )
                active[uid] = _Active(job, self.tokenizer)
            if not active:
                continue
            gone = [uid for uid, a in active.items() if a.job.cancel.is_set()]
            if gone:
                self._remove(gen, active, gone, "cancelled")
            if not active:
                continue
            try:
                _, responses = gen.next()
            except Exception as e:  # a failed step fails the requests in it; the server stays up
                log.exception("a batch step failed")
                for a in active.values():
                    a.job.emit("error", APIError(500, f"generation failed: {e}", "server_error"))
                    with self._lock:
                        self._pending -= 1
                        self._running -= 1
                active.clear()
                gen = self._new_batch()
                continue
            ours = []  # rows our stop strings ended (the generator only knows token stops)
            for r in responses:
                a = active.get(r.uid)
                if a is None:
                    continue
                if a.first_token is None:
                    a.first_token = time.perf_counter()
                a.job.generated += 1
                if r.finish_reason == "stop" and r.token in self.eos:
                    text, reason = a.filter.finish(), "stop"
                else:
                    text = a.filter.add(r.token)
                    reason = "stop" if a.filter.stopped else r.finish_reason
                    if reason is not None and not a.filter.stopped:
                        text += a.filter.finish()
                self._token_event(a, r.token, r.logprobs if r.token not in self.eos else None, text)
                if reason is None:
                    continue
                if r.finish_reason is not None:
                    self._keep(r.all_tokens, r.prompt_cache)
                    del active[r.uid]
                    self._finished(a.job, reason, a)
                else:
                    ours.append(r.uid)
            if ours:
                self._remove(gen, active, ours, "stop")

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
            with self._lock:
                self._running += 1
            if job.cancel.is_set():
                self._finished(job, "cancelled")
                continue
            try:
                self._run_one(job)
            except Exception as e:
                log.exception("a request failed")
                job.emit("error", APIError(500, f"generation failed: {e}", "server_error"))
                with self._lock:
                    self._pending -= 1
                    self._running -= 1

    def _run_one(self, job: Job) -> None:
        cache, rest = self._fetch(job.prompt)
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
            job.max_tokens,
            sampler=make_request_sampler(Sampling(s.temperature, s.top_p, s.top_k, s.min_p)),
            seed=seed,
            logits_processors=[job.grammar] if job.grammar is not None else None,
            stop=job.stop,
            cancel=job.cancel,
            prompt_cache=cache,
            prefill_step_size=self.prefill_step_size,
            draft_model=self.draft_model,
            num_draft_tokens=self.num_draft_tokens,
            lookup=self.lookup,
            context_tokens=job.prompt[: job.cached_tokens],
            **self.kv,
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
