"""The generation thread of the chat app: one long-lived thread that runs a backend's jobs.

MLX streams belong to the thread that made them, so the model is loaded and every reply is
generated on the same dedicated thread, under a thread-local stream (`mx.new_thread_local_stream`).
The UI never blocks on it: it queues jobs and receives events through `post`, a thread-safe
callback (the app wraps `App.post_message`). A job is stopped by setting its cancel flag, which the
generation loop checks after every token. The backends themselves are in `backend.py`.

Chat caches on disk are written here too, between jobs: after each reply (once its Finished event
is out, so the UI never waits for the write), when another chat is opened and at shutdown.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from qwen2_mlx.generation.reading_time import ReadingSpeed
from qwen2_mlx.generation.responses import GenerationStats

from .backend import Backend


# Events sent from the generation thread to the UI.
@dataclass
class Loading:
    fraction: float
    text: str


@dataclass
class Loaded:
    name: str
    context_limit: int
    seconds: float


@dataclass
class LoadFailed:
    error: str
    initial: bool = True  # the first model failed (the app cannot go on) vs. a switch (the old one stays)


@dataclass
class Stats(GenerationStats):
    """A reply's figures (qwen2_mlx's GenerationStats) plus the context meter's reading; from a server
    (`remote.RemoteResponse`), also the prompt tokens its cache supplied."""

    context_used: int = 0
    context_limit: int = 0
    cached_tokens: int = 0
    server: bool = False

    @classmethod
    def from_response(cls, r: Any, context_used: int, context_limit: int) -> Stats:
        base = GenerationStats.from_response(r)
        remote = {"cached_tokens": getattr(r, "cached_tokens", 0), "server": getattr(r, "server", False)}
        return cls(**vars(base), context_used=context_used, context_limit=context_limit, **remote)


@dataclass
class Token:
    job: int
    text: str
    stats: Stats


@dataclass
class Prefill:
    job: int
    done: int
    total: int


@dataclass
class Finished:
    job: int
    reason: str  # "stop" | "length" | "context" | "cancelled"
    text: str  # the whole reply as the backend recorded it
    stats: Stats


@dataclass
class Failed:
    job: int
    error: str
    context: bool = False  # the conversation no longer fits the context window (policy "refuse")


@dataclass
class PrefillRate:
    """How fast this model reads a prompt on this machine, measured by a short calibration."""

    speed: ReadingSpeed


SHUTDOWN_WAIT = 3.0  # seconds quitting waits for the generation thread (a reply's stop, the cache's save)


@dataclass
class CacheNote:
    """A line for the status bar about a chat's cache on disk (loaded, reused, ignored and why)."""

    text: str
    warning: bool = False


@dataclass
class Job:
    id: int
    history: list[dict]  # the conversation so far, ending with the user's message
    system: Optional[str]
    settings: dict
    cancel: threading.Event = field(default_factory=threading.Event)
    chat_key: Optional[str] = None  # which chat: its KV cache is kept on disk under this key


@dataclass
class _Switch:
    backend: Any


@dataclass
class _Task:
    """A call of a backend method on the engine's thread (backends without it skip it)."""

    method: str
    args: tuple = ()


class Engine:
    """Runs a backend on one thread: first the load, then queued generation jobs, one at a time."""

    def __init__(self, backend: Backend, post: Callable[[object], None]):
        self.backend = backend
        self.post = post
        self.jobs: queue.Queue[Any] = queue.Queue()  # Job, _Switch, or None to end
        self.current: Optional[Job] = None
        self.loaded = threading.Event()
        self.load_error: Optional[str] = None
        self._next_id = 0
        self.closing = False
        self._thread = threading.Thread(target=self._run, name="qwen2-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, history: list[dict], system: Optional[str], settings: dict, chat_key: Optional[str] = None) -> Job:
        self._next_id += 1
        job = Job(self._next_id, [dict(m) for m in history], system, dict(settings), chat_key=chat_key)
        self.jobs.put(job)
        return job

    def open_chat(self, chat_key: Optional[str], expect_cache: bool = False, kv_bits: Optional[int] = None) -> None:
        """A chat is on screen: save the previous chat's cache, load this one's (after queued jobs)."""
        self.jobs.put(_Task("open_chat", (chat_key, expect_cache, kv_bits)))

    def forget_chat(self, chat_key: str) -> None:
        self.jobs.put(_Task("forget_chat", (chat_key,)))

    def set_cache_budget(self, nbytes: int) -> None:
        self.jobs.put(_Task("set_cache_budget", (nbytes,)))

    def measure_prefill(self) -> None:
        """Time a short read on the generation thread; a PrefillRate event follows (backends without it: none)."""
        self.jobs.put(_Task("measure_prefill"))

    def cancel(self, job: Optional[Job] = None) -> None:
        """Stop `job` (default: the one running); queued jobs are dropped when cancelled too."""
        job = job or self.current
        if job is not None:
            job.cancel.set()

    def shutdown(self, timeout: float = SHUTDOWN_WAIT) -> None:
        """Stop the reply being written, drop queued ones, save the chat's cache; wait `timeout` at most.

        A save still running then is abandoned: its temporary file is removed on the next start and
        the chat's previous cache file (written when its last reply ended) stays valid.
        """
        self.closing = True
        if self.current is not None:
            self.current.cancel.set()
        self.jobs.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def busy(self) -> bool:
        """Whether the generation thread is still running (after shutdown: a step it could not leave yet)."""
        return self._thread.is_alive()

    @property
    def counts_tokens(self) -> bool:
        """Whether the backend can count tokens here (a server's model cannot: no tokenizer)."""
        return getattr(self.backend, "counts_tokens", True)

    def count_tokens(self, history: list[dict], system: Optional[str]) -> Optional[int]:
        """Tokens of this conversation; None when the backend has no tokenizer here (a server)."""
        if not self.counts_tokens:
            return None
        if not self.loaded.is_set() or self.load_error:
            return 0
        try:
            return self.backend.count_tokens(history, system)
        except Exception:  # the meter is advisory; a template error shows up when generating
            return 0

    def switch(self, backend: Backend) -> None:
        """Load another model after the queued jobs; on failure the current one stays."""
        self.jobs.put(_Switch(backend))

    def _call(self, method: str, *args: Any) -> None:
        """Run a backend's cache method; its note goes to the status bar, its failure too (never the app)."""
        fn = getattr(self.backend, method, None)
        if fn is None:
            return
        try:
            note = fn(*args)
        except Exception as e:
            what = "reading speed" if method == "measure_prefill" else "chat cache"
            note = (f"{what}: {method} failed ({type(e).__name__}: {e})", True)
        if isinstance(note, ReadingSpeed):  # measure_prefill's
            self.post(PrefillRate(note))
        elif note:
            self.post(CacheNote(*note))

    def _load(self, backend: Backend, initial: bool) -> bool:
        tic = time.perf_counter()
        try:
            backend.load(lambda f, t: self.post(Loading(f, t)))
        except Exception as e:
            error = str(e) or type(e).__name__
            if initial:
                self.load_error = error
            self.post(LoadFailed(error, initial))
            return False
        if not initial:
            self._call("persist")  # the outgoing model's cache, before it is dropped
        self.backend = backend
        self.loaded.set()  # before Loaded is out: the UI counts tokens (context meter, attachments) on it
        self.post(Loaded(backend.name, backend.context_limit, time.perf_counter() - tic))
        return True

    def _run(self) -> None:
        stream = _thread_stream()
        with _use_stream(stream):
            ok = self._load(self.backend, initial=True)
            self.loaded.set()
            if not ok:
                return
            while True:
                job = self.jobs.get()
                if job is None:
                    self._call("persist")  # at quit: the cache of the chat last answered
                    return
                if isinstance(job, _Switch):
                    self._load(job.backend, initial=False)
                    continue
                if isinstance(job, _Task):
                    self._call(job.method, *job.args)
                    continue
                if self.closing:
                    continue  # queued replies are dropped at quit
                self.current = job
                try:
                    self._generate(job)
                finally:
                    self.current = None
                self._call("persist")  # after Finished is out: the UI is not kept waiting

    def _generate(self, job: Job) -> None:
        limit = self.backend.context_limit
        parts: list[str] = []
        last = None
        try:
            if job.cancel.is_set():
                self.post(Finished(job.id, "cancelled", "", Stats(context_limit=limit)))
                return
            if job.chat_key is not None:
                self._call("open_chat", job.chat_key, False, job.settings.get("kv_bits"))
            # Long prompts take a while to read: the backend reports progress through this hook.
            self.backend.prefill_progress = lambda done, total: self.post(Prefill(job.id, done, total))
            for r in self.backend.generate(job.history, job.system, job.settings, job.cancel):
                last = r
                if r.text:
                    parts.append(r.text)
                    used = getattr(self.backend, "context_used", 0) or 0
                    self.post(Token(job.id, r.text, Stats.from_response(r, used, limit)))
            text = getattr(self.backend, "last_reply", None)
            text = "".join(parts) if text is None else text
            reason = (last.finish_reason if last is not None else None) or (
                "cancelled" if job.cancel.is_set() else "stop"
            )
            used = getattr(self.backend, "context_used", 0) or 0
            stats = Stats.from_response(last, used, limit) if last is not None else Stats(context_limit=limit)
            self.post(Finished(job.id, reason, text, stats))
            note = getattr(self.backend, "cache_note", None)
            if note:
                self.post(CacheNote(*note))
        except Exception as e:  # any model error ends this reply, never the app
            if type(e).__name__ == "ContextOverflowError":
                self.post(Failed(job.id, str(e), context=True))
            else:
                self.post(Failed(job.id, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__))


def _thread_stream():
    try:
        import mlx.core as mx
    except ImportError:  # the fake backend in tests needs no MLX
        return None
    return mx.new_thread_local_stream(mx.default_device())


class _use_stream:
    def __init__(self, stream):
        self.stream = stream
        self.ctx = None

    def __enter__(self):
        if self.stream is not None:
            import mlx.core as mx

            self.ctx = mx.stream(self.stream)
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False
