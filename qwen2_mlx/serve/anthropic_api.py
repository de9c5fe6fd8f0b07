"""Anthropic's Messages API: request parsing, the response body and its stream of events.

Messages with `tool_use` / `tool_result` blocks become the template's `tool_calls` and `tool`
messages; tools' `input_schema` becomes the function's `parameters`. Usage follows Anthropic's
split: `input_tokens` are the prompt tokens prefilled now, `cache_read_input_tokens` those the
prefix cache supplied.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .protocol import APIError, Spec, bad, content_text
from .schemas import MessagesRequest, validate
from .tools import ToolCall

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def error_body(e: APIError) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}


def _tools(tools: Any) -> list:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad("'tools' must be a list", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise bad(f"tools.{i}: a tool needs a 'name'", "tools")
        schema = t.get("input_schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise bad(f"tools.{i}.input_schema must be an object", "tools")
        fn = {"name": t["name"], "description": t.get("description", ""), "parameters": schema}
        out.append({"type": "function", "function": fn})
    return out


def _messages(msgs: Any) -> list:
    if not isinstance(msgs, list):
        raise bad("messages: must be a list", "messages")
    if not msgs:
        raise bad("messages: at least one message is required", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise bad(f"{where}: must be an object", "messages")
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise bad(f"{where}.role: must be 'user' or 'assistant', got {role!r}", "messages")
        if not isinstance(content, list):
            out.append({"role": role, "content": content_text(content, where)})
            continue
        text, calls = [], []
        for k, b in enumerate(content):
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise bad(f"{where}.content.{k}: tool_use needs 'name' and an 'input' object", "messages")
                calls.append({"type": "function", "function": {"name": b["name"], "arguments": b.get("input", {})}})
            elif kind == "tool_result" and role == "user":
                if text:
                    out.append({"role": "user", "content": "".join(text)})
                    text = []
                out.append({"role": "tool", "content": content_text(b.get("content", ""), f"{where}.content.{k}")})
            else:
                text.append(content_text([b], where))
        if calls:
            out.append({"role": "assistant", "content": "".join(text), "tool_calls": calls})
        elif text or not any(o["role"] == "tool" for o in out[-1:]):
            out.append({"role": role, "content": "".join(text)})
    return out


def _output_format(body: dict):
    """Structured output: `output_config.format` (or the older `output_format`) of type json_schema."""
    oc = body.get("output_config")
    if oc is not None and not isinstance(oc, dict):
        raise bad("output_config: must be an object", "output_config")
    fmt = (oc or {}).get("format", body.get("output_format"))
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad("output_config.format: must be {'type': 'json_schema', 'schema': {...}}", "output_config")
    return fmt["schema"] or True


def parse_messages(body: dict) -> Spec:
    req = validate(MessagesRequest, body)
    spec = Spec(model=req.model, messages=_messages(req.messages))
    if req.system is not None:
        spec.messages.insert(0, {"role": "system", "content": content_text(req.system, "system")})
    spec.max_tokens = req.max_tokens
    spec.sampling = req.sampling()
    spec.stop = [s for s in req.stop_sequences or [] if s]
    spec.stream = bool(req.stream)
    choice = req.tool_choice
    spec.tools = [] if isinstance(choice, dict) and choice.get("type") == "none" else _tools(req.tools)
    spec.schema = _output_format(body)
    return spec


class AnthropicFormat:
    def __init__(self, spec: Spec, model: str):
        self.spec, self.model = spec, model
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self.block_open = False
        self.blocks = 0

    @staticmethod
    def stop_reason(reason: str, calls: list, stop_sequence) -> str:
        if calls:
            return "tool_use"
        if reason in ("length", "context"):
            return "max_tokens"
        return "stop_sequence" if stop_sequence else "end_turn"

    @staticmethod
    def usage(info: dict) -> dict:
        return {
            "input_tokens": info["prompt_tokens"] - info["cached_tokens"],
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": info["cached_tokens"],
            "output_tokens": info["completion_tokens"],
        }

    @staticmethod
    def _tool_block(c: ToolCall) -> dict:
        return {"type": "tool_use", "id": "toolu_" + c.id.removeprefix("call_"), "name": c.name, "input": c.arguments}

    def response(self, text: str, calls: list, reason: str, info: dict, entries: list) -> dict:
        content = ([{"type": "text", "text": text}] if text or not calls else []) + [self._tool_block(c) for c in calls]
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": self.stop_reason(reason, calls, info.get("stop_sequence")),
            "stop_sequence": info.get("stop_sequence"),
            "usage": self.usage(info),
        }

    @staticmethod
    def _event(name: str, data: dict) -> str:
        return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def start(self, info: dict) -> list[str]:
        msg = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": dict(self.usage(dict(info, completion_tokens=0)), output_tokens=1),
        }
        return [
            self._event("message_start", {"type": "message_start", "message": msg}),
            self._event("ping", {"type": "ping"}),
        ]

    def delta(self, text: str, entries: list) -> list[str]:
        if not text:
            return []
        out = []
        if not self.block_open:
            self.block_open = True
            block = {"type": "content_block_start", "index": self.blocks, "content_block": {"type": "text", "text": ""}}
            out.append(self._event("content_block_start", block))
        delta = {"type": "content_block_delta", "index": self.blocks, "delta": {"type": "text_delta", "text": text}}
        out.append(self._event("content_block_delta", delta))
        return out

    def _close(self) -> list[str]:
        if not self.block_open:
            return []
        self.block_open = False
        self.blocks += 1
        return [self._event("content_block_stop", {"type": "content_block_stop", "index": self.blocks - 1})]

    def end(self, text: str, calls: list, reason: str, info: dict) -> list[str]:
        out = self.delta(text, []) + self._close()
        for c in calls:
            block = dict(self._tool_block(c), input={})
            i = self.blocks
            out.append(
                self._event("content_block_start", {"type": "content_block_start", "index": i, "content_block": block})
            )
            delta = {"type": "input_json_delta", "partial_json": c.arguments_json}
            out.append(self._event("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}))
            out.append(self._event("content_block_stop", {"type": "content_block_stop", "index": i}))
            self.blocks += 1
        stop = {
            "stop_reason": self.stop_reason(reason, calls, info.get("stop_sequence")),
            "stop_sequence": info.get("stop_sequence"),
        }
        out.append(self._event("message_delta", {"type": "message_delta", "delta": stop, "usage": self.usage(info)}))
        out.append(self._event("message_stop", {"type": "message_stop"}))
        return out

    def error(self, e: APIError) -> list[str]:
        return [self._event("error", error_body(e))]
