"""What the two APIs share: the error type, field validators, and the engine's request (`Job`).

Plain Python (no MLX): the HTTP side validates and describes a request here; the engine runs it.
A validator raises `APIError` naming the field, which the app answers as a 4xx in the shape of the
API the client speaks (OpenAI's `{"error": {...}}` or Anthropic's `{"type": "error", ...}`).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Optional


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


def _type_name(v: Any) -> str:
    return (
        "null"
        if v is None
        else {bool: "boolean", int: "integer", float: "number", str: "string"}.get(
            type(v), "array" if isinstance(v, list) else "object" if isinstance(v, dict) else type(v).__name__
        )
    )


def get_number(body: dict, name: str, default, lo=None, hi=None, integer: bool = False):
    """body[name] as a number within [lo, hi]; None or absent gives `default`."""
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {_type_name(v)}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else ""
        raise bad(f"'{name}' must be {rng}, got {v}", name)
    return v


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {_type_name(v)}", name)
    return v


def get_stop(body: dict, name: str) -> list[str]:
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return [s for s in v if s]
    raise bad(f"'{name}' must be a string or a list of strings", name)


def get_dict(body: dict, name: str) -> dict:
    v = body.get(name)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad(f"'{name}' must be an object, got {_type_name(v)}", name)
    return v


@dataclass
class Sampling:
    """The settings a request samples with (temperature 0: greedy)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None


@dataclass
class Job:
    """One generation the engine runs; events come back on `events` (an asyncio queue of `loop`).

    Events: ("token", text, token_id, logprob_entry_or_None), then one of ("done", reason, info)
    or ("error", APIError). `cancel` set from any thread ends the generation at the next step.
    """

    prompt: list
    max_tokens: Optional[int]
    sampling: Sampling = field(default_factory=Sampling)
    stop: list = field(default_factory=list)
    grammar: Any = None  # a logits processor (generation/structured.py) or None
    logprobs: bool = False
    top_logprobs: int = 0
    loop: Any = None
    events: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0
    generated: int = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.events = loop, asyncio.Queue()

    def emit(self, *event) -> None:
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
    raise bad(f"{where}: 'content' must be a string or a list of parts, got {_type_name(content)}", where)
