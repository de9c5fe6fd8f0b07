"""What the two APIs share: the error type, a validated request (`Spec`), the engine's request
(`Job`) and the events it sends back (`TokenEvent`, `DoneEvent`, `ErrorEvent`).

Plain Python (no MLX): the HTTP side validates and describes a request here; the engine runs it.
A validator raises `APIError` naming the field, which the app answers as a 4xx in the shape of the
API the client speaks (OpenAI's `{"error": {...}}` or Anthropic's `{"type": "error", ...}`).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Union


class APIError(Exception):
    """A request the server refuses: HTTP status, message, and OpenAI-style type/param/code."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def bad(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)


def type_name(v: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    names = {int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return next((n for t, n in names.items() if isinstance(v, t)), type(v).__name__)


@dataclass
class Sampling:
    """The settings a request samples with (temperature 0: greedy)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None


@dataclass
class Spec:
    """A validated request, before tokenization: what to render and how to sample."""

    model: str
    messages: Optional[list] = None  # chat: messages for the template
    prompt: Any = None  # completions: a string or token ids
    tools: list = field(default_factory=list)
    max_tokens: Optional[int] = None
    sampling: Sampling = field(default_factory=Sampling)
    stop: list = field(default_factory=list)
    schema: Any = None  # None: free text; True: any JSON object; a dict: a JSON schema
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False


@dataclass
class TokenEvent:
    """Text produced by one step (may be empty while a stop string is pending); `logprob` when asked for."""

    text: str
    token: int
    logprob: Optional[dict] = None


@dataclass
class DoneEvent:
    """The request ended: its finish reason and usage figures (tokens, cached tokens, stop sequence, TTFT)."""

    reason: str
    info: dict


@dataclass
class ErrorEvent:
    """The request failed; `error` says why in the API's terms."""

    error: APIError


Event = Union[TokenEvent, DoneEvent, ErrorEvent]


@dataclass(eq=False)  # a job is itself: the engine keeps the ones it holds in a set
class Job:
    """One generation the engine runs; its events come back on `events` (an asyncio queue of `loop`).

    Events: `TokenEvent`s, then one `DoneEvent` or `ErrorEvent`. `cancel` set from any thread
    ends the generation at the next step.
    """

    prompt: list
    max_tokens: Optional[int]
    sampling: Sampling = field(default_factory=Sampling)
    stop: list = field(default_factory=list)
    grammar: Any = None  # a logits processor (generation/structured.py) or None
    schema: Any = None  # what `grammar` was compiled from (Spec.schema), for the other ranks under mlx.launch
    logprobs: bool = False
    top_logprobs: int = 0
    loop: Any = None
    events: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0
    generated: int = 0
    failure: Optional[APIError] = None  # set on the engine thread when this request's sampler or grammar fails

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.events = loop, asyncio.Queue()

    def emit(self, event: Event) -> None:
        """Called on the engine thread: hand an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed (server shutting down)
            self.cancel.set()


def content_text(content: Any, where: str, allow_none: bool = False) -> str:
    """A message's content as text: a string, or a list of text parts (OpenAI and Anthropic spell them alike)."""
    if content is None:
        if allow_none:
            return ""
        raise bad(f"{where}: 'content' is missing", where)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if isinstance(p, str):
                parts.append(p)
                continue
            if not isinstance(p, dict) or not isinstance(p.get("type"), str):
                raise bad(f"{where}.content[{i}] must be an object with a 'type'", where)
            if p["type"] in ("text", "input_text"):
                if not isinstance(p.get("text"), str):
                    raise bad(f"{where}.content[{i}].text must be a string", where)
                parts.append(p["text"])
            elif p["type"] in ("image_url", "image", "input_image", "document"):
                raise bad(f"{where}.content[{i}]: this model reads text only ({p['type']} is not supported)", where)
            else:
                raise bad(f"{where}.content[{i}]: unknown content type '{p['type']}'", where)
        return "".join(parts)
    raise bad(f"{where}: 'content' must be a string or a list of parts, got {type_name(content)}", where)
