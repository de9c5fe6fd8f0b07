"""OpenAI's Chat Completions and (legacy) Completions: request parsing and response shapes.

`parse_chat`/`parse_completion` turn a JSON body into a `Spec` (or raise APIError naming the
field); `OpenAIFormat` writes the non-streamed body and the server-sent-event chunks, including
`usage.prompt_tokens_details.cached_tokens`, `logprobs` and `tool_calls`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Optional

from .protocol import APIError, Spec, bad, content_text
from .schemas import ChatRequest, CompletionRequest, validate
from .tools import ToolCall, openai_tools

ROLES = ("system", "developer", "user", "assistant", "tool")


def _common(req: Any, spec: Spec) -> Spec:
    spec.max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    spec.sampling = req.sampling()
    stop = req.stop if isinstance(req.stop, list) else [req.stop] if req.stop else []
    spec.stop = [s for s in stop if s]
    spec.stream = bool(req.stream)
    spec.include_usage = bool(spec.stream and req.stream_options and req.stream_options.include_usage)
    return spec


def _response_format(body: dict):
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad("'response_format' must be an object with a 'type'", "response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return True
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), (dict, bool)):
            raise bad("'response_format.json_schema' must be an object with a 'schema' object", "response_format")
        if "name" in js and not isinstance(js["name"], str):
            raise bad("'response_format.json_schema.name' must be a string", "response_format")
        # `strict` or not, the schema is enforced while sampling: the reply always conforms.
        return js.get("schema", {}) or True
    raise bad(f"'response_format.type' must be text, json_object or json_schema, got '{kind}'", "response_format")


def _message(m: Any, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"{where} must be an object", "messages")
    role = m.get("role")
    if role not in ROLES:
        raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
    role = "system" if role == "developer" else role
    calls = m.get("tool_calls") if role == "assistant" else None
    out = {"role": role, "content": content_text(m.get("content"), where, allow_none=bool(calls))}
    if calls:
        if not isinstance(calls, list):
            raise bad(f"{where}.tool_calls must be a list", "messages")
        out["tool_calls"] = []
        for k, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad(f"{where}.tool_calls[{k}] needs function.name", "messages")
            args = fn.get("arguments", {})
            if isinstance(args, str):  # the template writes arguments with tojson: give it the object
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    raise bad(f"{where}.tool_calls[{k}].function.arguments is not valid JSON", "messages") from None
            out["tool_calls"].append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    if role == "tool" and isinstance(m.get("name"), str):
        out["name"] = m["name"]
    return out


def parse_chat(body: dict) -> Spec:
    req = validate(ChatRequest, body)
    spec = Spec(model=req.model or "", messages=[_message(m, i) for i, m in enumerate(req.messages)])
    spec.tools = [] if req.tool_choice == "none" else openai_tools(req.tools)
    spec = _common(req, spec)
    spec.schema = _response_format(body)
    spec.logprobs = bool(req.logprobs)
    spec.top_logprobs = req.top_logprobs or 0
    if spec.top_logprobs and not spec.logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return spec


def parse_completion(body: dict) -> Spec:
    req = validate(CompletionRequest, body)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):  # [prompt]: one prompt in a list
        prompt = prompt[0]
    if not prompt:
        raise bad("'prompt' is empty", "prompt")
    spec = _common(req, Spec(model=req.model or "", prompt=prompt))
    spec.logprobs, spec.top_logprobs = req.logprobs is not None, req.logprobs or 0
    return spec


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


class OpenAIFormat:
    """Response bodies and stream chunks for one request (chat or text completion)."""

    def __init__(self, spec: Spec, model: str, chat: bool):
        self.spec, self.model, self.chat = spec, model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    # pieces ------------------------------------------------------------------------------------
    def _logprob(self, e: dict):
        if self.chat:
            return {
                "token": e["token"],
                "logprob": e["logprob"],
                "bytes": list(e["token"].encode("utf-8")),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, v in e["top"]],
            }
        return e

    def _logprobs(self, entries: list):
        if not self.spec.logprobs:
            return None
        if self.chat:
            return {"content": [self._logprob(e) for e in entries]}
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries],
        }

    def usage(self, info: dict) -> dict:
        return {
            "prompt_tokens": info["prompt_tokens"],
            "completion_tokens": info["completion_tokens"],
            "total_tokens": info["prompt_tokens"] + info["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": info["cached_tokens"]},
        }

    @staticmethod
    def finish_reason(reason: str, calls: list) -> str:
        if calls:
            return "tool_calls"
        return "length" if reason in ("length", "context") else "stop"

    @staticmethod
    def _calls(calls: list[ToolCall]) -> list:
        return [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}} for c in calls
        ]

    # whole response ------------------------------------------------------------------------------
    def response(self, text: str, calls: list, reason: str, info: dict, entries: list) -> dict:
        choice: dict = {
            "index": 0,
            "logprobs": self._logprobs(entries),
            "finish_reason": self.finish_reason(reason, calls),
        }
        if self.chat:
            msg: dict = {"role": "assistant", "content": text if (text or not calls) else None}
            if calls:
                msg["tool_calls"] = self._calls(calls)
            choice["message"] = msg
        else:
            choice["text"] = text
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "qwen2-mlx",
            "choices": [choice],
            "usage": self.usage(info),
        }

    # stream -----------------------------------------------------------------------------------------
    def _chunk(self, choices: list, usage: Optional[dict] = None, last: bool = False) -> str:
        body = {
            "id": self.id,
            "object": self.object + ".chunk" if self.chat else self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "qwen2-mlx",
            "choices": choices,
        }
        if self.spec.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def start(self, info: dict) -> list[str]:
        if not self.chat:
            return []
        return [
            self._chunk(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
        ]

    def delta(self, text: str, entries: list) -> list[str]:
        lp = self._logprobs(entries) if entries else None
        if self.chat:
            return [self._chunk([{"index": 0, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}])]
        return [self._chunk([{"index": 0, "text": text, "logprobs": lp, "finish_reason": None}])]

    def end(self, text: str, calls: list, reason: str, info: dict) -> list[str]:
        out = []
        if text:
            out += self.delta(text, [])
        fr = self.finish_reason(reason, calls)
        if self.chat:
            delta: dict = {}
            if calls:
                delta["tool_calls"] = [dict(c, index=i) for i, c in enumerate(self._calls(calls))]
            out.append(self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": fr}]))
        else:
            out.append(self._chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": fr}]))
        if self.spec.include_usage:
            out.append(self._chunk([], self.usage(info)))
        out.append("data: [DONE]\n\n")
        return out

    def error(self, e: APIError) -> list[str]:
        return [f"data: {json.dumps(error_body(e))}\n\n", "data: [DONE]\n\n"]
