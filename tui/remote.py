"""The chat app on a server: `RemoteBackend` answers through an OpenAI-compatible chat-completions API.

`qwen2-chat --server URL` drives `qwen2-serve` (local, on another Mac, or across Macs) or any other
OpenAI-compatible server with the official `openai` client. The app keeps everything else local: the
store, branches, export; each reply sends the whole branch, and the server's prefix cache makes that cheap.
The client is the async one, on a loop thread of its own, because only cancelling the task that reads
the stream closes the socket at once (a blocked synchronous read ignores a close from another thread), and
the closed connection is what tells the server to stop generating.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

from qwen2_mlx.generation.responses import GenerationStats

API_KEY_ENV = "QWEN2_CHAT_API_KEY"
CONNECT_TIMEOUT = 10.0  # seconds; a reply itself may take minutes to its first token (a long prompt)
# Sampling settings OpenAI's own API does not define; vLLM, mlx-lm and qwen2-serve take (or ignore) them.
EXTRAS = ("top_k", "min_p", "repetition_penalty")
# Chat settings that act on a model in this process; on a server they are the server's business.
LOCAL_ONLY = {
    "kv_bits": "KV-cache quantization is the server's setting (qwen2-serve --kv-bits)",
    "lookup": "speculative decoding is the server's setting (qwen2-serve --lookup or --draft-model)",
    "context_policy": "dropping old turns needs the tokenizer here; the server refuses what does not fit",
    "cache_disk": "chat caches on disk belong to a local model; the server keeps its own prefix cache",
    "model": "the model is the server's: restart qwen2-chat with --model-id (one of its /v1/models) or --model PATH",
}
# A fast server sends hundreds of chunks a second; the screen gets them in pieces at most this often (s),
# or it would spend its time redrawing and fall behind the stream and the keyboard.
PIECE_EVERY = 0.05
MIN_RATE_SPAN = 0.25  # seconds of streaming before the status bar shows a generation rate
_DONE = object()


class ServerError(RuntimeError):
    """The server cannot be used, or failed a request: the message is one line for the user."""


class ContextOverflowError(ValueError):
    """The server says the conversation does not fit its context window (named like qwen2_mlx's)."""


@dataclass
class RemoteResponse(GenerationStats):
    """One piece of a reply with the figures known so far (no memory figure: the server's is not ours)."""

    text: str = ""
    finish_reason: Optional[str] = None
    cached_tokens: int = 0  # prompt tokens the server's prefix cache supplied (`usage`)
    server: bool = True


def api_base(url: str) -> str:
    """The API's base URL (`…/v1`) from what the user typed; ValueError naming the problem."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--server {url!r}: expected a URL like http://127.0.0.1:8080")
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path if path.endswith('/v1') else path + '/v1'}"


def _detail(e: Exception) -> str:
    """What an openai error says, without the client's "Error code: …" wrapping."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "message", "") or e) or type(e).__name__


class RemoteBackend:
    """A model behind an OpenAI-compatible server. Every method runs on the engine's thread."""

    counts_tokens = False  # no tokenizer here: the context meter reads the server's `usage`
    load_hint = "hint: start the server (qwen2-serve), or check --server and the API key"

    def __init__(self, url: str, api_key: Optional[str] = None, model_id: Optional[str] = None):
        self.url = url
        self.base = api_base(url)
        self.host = urlsplit(self.base).netloc
        self.api_key = api_key
        self.model_id = model_id
        self.name = model_id or self.host
        self.context_limit = 0
        self.context_used = 0
        self.last_reply: Optional[str] = None
        self.prefill_progress: Optional[Callable[[int, int], None]] = None
        self.cache_note: Optional[tuple[str, bool]] = None
        self.extras = True  # send EXTRAS until the server refuses one
        self._first_note: Optional[tuple[str, bool]] = None  # said after the first reply
        self._said: set[str] = set()
        self._client: Any = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # --- connecting ---------------------------------------------------------------------------------
    def load(self, progress: Callable[[float, str], None]) -> None:
        """Ask the server for its models (once): which one to use, and its context window if it says."""
        if self._client is not None:
            progress(1.0, f"connected to {self.host}")
            return
        import httpx
        from openai import AsyncOpenAI

        progress(0.0, f"connecting to {self.base}")
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="qwen2-remote", daemon=True).start()
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT)
        client = AsyncOpenAI(base_url=self.base, api_key=self.api_key or "none", max_retries=0, timeout=timeout)
        try:
            cards = self._call(self._models(client))
        except ServerError as e:
            if self.model_id is None or getattr(e.__cause__, "status_code", None) != 404:
                raise
            cards = []  # a server without /v1/models: the model named on the command line
        self._choose(cards)
        self._client = client
        progress(1.0, f"connected to {self.host}: {self.model_id}")

    async def _models(self, client) -> list[dict]:
        page = await client.models.list()
        return [m.model_dump() for m in page.data]

    def _choose(self, cards: list[dict]) -> None:
        ids = [str(c.get("id")) for c in cards]
        if self.model_id is not None and cards and self.model_id not in ids:
            raise ServerError(f"the server at {self.host} has no model {self.model_id!r}; it serves: {', '.join(ids)}")
        if self.model_id is None:
            if not ids:
                raise ServerError(f"the server at {self.host} lists no models; name one with --model-id")
            self.model_id = ids[0]
        card = cards[ids.index(self.model_id)] if self.model_id in ids else {}
        for field in ("context_window", "max_model_len", "context_length"):  # qwen2-serve, vLLM, others
            if isinstance(card.get(field), int) and card[field] > 0:
                self.context_limit = card[field]
                break
        self.name = f"{self.model_id} @ {self.host}"
        if len(ids) > 1:
            self._first_note = (f"the server offers {len(ids)} models; using {self.model_id} (--model-id)", False)

    def _call(self, coro):
        """Run a coroutine on the client's loop and wait for it; errors become one line."""
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        except Exception as e:
            raise self._error(e) from e

    def _error(self, e: Exception, streaming: bool = False) -> Exception:
        """One line for `e`; `streaming`: the reply had begun, so a broken connection is a server gone."""
        import httpx
        import openai

        if isinstance(e, (ServerError, ContextOverflowError)):
            return e
        broken = isinstance(e, (openai.APIConnectionError, httpx.HTTPError, OSError))
        if streaming and broken:
            return ServerError(f"the server at {self.host} went away mid-reply ({_detail(e.__cause__ or e)})")
        if isinstance(e, openai.AuthenticationError):
            return ServerError(f"the server at {self.host} refused the API key (401): set ${API_KEY_ENV} or --api-key")
        if isinstance(e, openai.APIConnectionError) or isinstance(e, (httpx.ConnectError, OSError)):
            return ServerError(f"cannot reach the server at {self.base} ({_detail(e.__cause__ or e)}): is it running?")
        if isinstance(e, openai.BadRequestError) and "context" in str(getattr(e, "code", "") or _detail(e)).lower():
            return ContextOverflowError(_detail(e))
        if isinstance(e, openai.APIStatusError):
            return ServerError(f"the server at {self.host} answered {e.status_code}: {_detail(e)}")
        if isinstance(e, (httpx.HTTPError, openai.APIError)):
            return ServerError(f"the server at {self.host} failed the request ({_detail(e)})")
        return e

    # --- a reply ------------------------------------------------------------------------------------
    def request(self, history: list[dict], system: Optional[str], settings: dict) -> dict:
        """The chat-completions request for this branch with this chat's sampling settings."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": m["role"], "content": m["content"]} for m in history
        ]
        body: dict = {"model": self.model_id, "messages": messages}
        for key in ("temperature", "top_p", "max_tokens", "seed"):
            if settings.get(key) is not None:
                body[key] = settings[key]
        extra = {k: settings[k] for k in EXTRAS if settings.get(k) is not None}
        if extra and self.extras:
            body["extra_body"] = extra
        return body

    def generate(self, history, system, settings, cancel: threading.Event) -> Iterator[RemoteResponse]:
        self.cache_note, self._first_note = self._ignored(settings) or self._first_note, None
        self.last_reply = None
        body = self.request(history, system, settings)
        try:
            yield from self._stream(body, cancel)
        except ServerError as e:
            if not (self.extras and "extra_body" in body and any(k in str(e) for k in EXTRAS)):
                raise
            self.extras = False  # a strict server: sample with what OpenAI's API defines
            self.cache_note = (f"the server refused {', '.join(body['extra_body'])}; sent without them", True)
            del body["extra_body"]
            yield from self._stream(body, cancel)

    def _ignored(self, settings: dict) -> Optional[tuple[str, bool]]:
        """A status line, once per setting and session, for settings this chat has that only a local model has."""
        used = [k for k in ("kv_bits", "lookup") if settings.get(k)] + (
            ["context_policy"] if settings.get("context_policy") not in (None, "refuse") else []
        )
        new = [k for k in used if k not in self._said]
        self._said.update(new)
        return (f"ignored here: {'; '.join(LOCAL_ONLY[k] for k in new)}", False) if new else None

    def local_only(self, key: str) -> Optional[str]:
        """Why setting `key` does nothing with the model on a server (None when it does something)."""
        return LOCAL_ONLY.get(key)

    def _stream(self, body: dict, cancel: threading.Event) -> Iterator[RemoteResponse]:
        out: queue.Queue = queue.Queue()
        tally = _Tally(time.perf_counter())
        future = asyncio.run_coroutine_threadsafe(self._pump(body, out), self._loop)
        pending: list[str] = []  # text come since the last piece handed on
        shown = 0.0  # when the last piece was handed on
        try:
            while True:
                if cancel.is_set():
                    future.cancel()  # the task closes the stream: the server sees the disconnect
                    yield tally.response("".join(pending), "cancelled")
                    break
                try:
                    item = out.get(timeout=PIECE_EVERY if pending else 0.05)
                except queue.Empty:
                    item = None
                if isinstance(item, BaseException) or item is _DONE:
                    if pending:  # what came before the end is on screen before the end is said
                        yield tally.response("".join(pending))
                        pending = []
                    if item is _DONE:
                        yield tally.response("", tally.finish or "stop")
                        break
                    raise self._error(item, streaming=tally.received)
                text = tally.add(item) if item is not None else ""
                if text:
                    pending.append(text)
                if pending and (item is None or time.perf_counter() - shown >= PIECE_EVERY):
                    shown = time.perf_counter()
                    yield tally.response("".join(pending))
                    pending = []
        finally:
            future.cancel()
            self.last_reply = "".join(tally.parts)
            self.context_used = tally.prompt_tokens + tally.generation_tokens if tally.usage else 0

    async def _pump(self, body: dict, out: queue.Queue) -> None:
        """Read the stream into `out`, ending with _DONE or the exception; cancelled, it closes the stream."""
        try:
            stream = await self._client.chat.completions.create(
                **body, stream=True, stream_options={"include_usage": True}
            )
            async with stream:
                async for chunk in stream:
                    out.put(chunk)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            out.put(e)
            return
        out.put(_DONE)


class _Tally:
    """A reply's text and figures as the chunks come: TTFT and tok/s timed here, token counts from `usage`."""

    def __init__(self, started: float):
        self.started = started
        self.parts: list[str] = []
        self.first: Optional[float] = None
        self.last = started
        self.chunks = 0
        self.received = False  # any chunk came: the reply had begun
        self.finish: Optional[str] = None
        self.usage = False
        self.prompt_tokens = self.cached_tokens = self.generation_tokens = 0

    def add(self, chunk) -> str:
        self.received = True
        if chunk.usage is not None:
            self.usage = True
            self.prompt_tokens = chunk.usage.prompt_tokens or 0
            self.generation_tokens = chunk.usage.completion_tokens or 0
            details = chunk.usage.prompt_tokens_details
            self.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
        if not chunk.choices:
            return ""
        choice = chunk.choices[0]
        if choice.finish_reason:
            self.finish = {"length": "length"}.get(choice.finish_reason, "stop")
        text = choice.delta.content or "" if choice.delta is not None else ""
        if text:
            now = time.perf_counter()
            self.first = self.first or now
            self.last = now
            self.chunks += 1
            if not self.usage:
                self.generation_tokens = self.chunks  # one chunk a token until `usage` says
            self.parts.append(text)
        return text

    def response(self, text: str, finish: Optional[str] = None) -> RemoteResponse:
        ttft = (self.first or time.perf_counter()) - self.started
        span = self.last - self.first if self.first is not None else 0.0
        # Chunks can arrive in bursts: a rate over a fraction of a second would be noise, so none is shown.
        tps = (self.generation_tokens - 1) / span if span >= MIN_RATE_SPAN and self.generation_tokens > 1 else 0.0
        return RemoteResponse(
            text=text,
            finish_reason=finish,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            generation_tps=tps,
            time_to_first_token=ttft,
            cached_tokens=self.cached_tokens,
        )
