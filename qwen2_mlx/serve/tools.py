"""Tool calls in Qwen2.5's chat-template format: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

`ToolCallSplitter` sits on the streamed text of a request that offered tools: ordinary text passes
through at once, anything from `<tool_call>` on is held back (a partial `<tool_c` at the end too)
and parsed when the reply ends. A block whose JSON does not parse stays text, so nothing the model
wrote is lost. The parsing is mlx-lm's (`tool_parsers/json_tools.py`, the same JSON-in-tags
format); the splitting is ours because our streams already carry stop-string filtering.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def parse_call(text: str) -> ToolCall:
    """One block's JSON -> ToolCall (ValueError when it is not a call)."""
    from mlx_lm.tool_parsers.json_tools import parse_tool_call

    data = parse_tool_call(text.strip())
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError("not a tool call")
    args = data.get("arguments", {})
    if isinstance(args, str):
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError("arguments must be an object")
    return ToolCall(data["name"], args, f"call_{uuid.uuid4().hex[:24]}")


class ToolCallSplitter:
    """Streamed text in, (text to show now) out; `finish()` gives the rest and the parsed calls.

    Small models often answer a tool request with the bare call, as JSON or in a ```json fence,
    instead of inside the tags: a reply that starts that way is held to its end and becomes a call
    when it names one of `names` (the offered tools); otherwise it is released as text.
    """

    def __init__(self, names=()):
        self.names = set(names)
        self.held = ""
        self.in_call = False
        self.shown = False

    def feed(self, text: str) -> str:
        if self.in_call:
            self.held += text
            return ""
        buf = self.held + text
        i = buf.find(OPEN)
        if i >= 0:
            self.in_call, self.held = True, buf[i:]
            return self._show(buf[:i])
        start = buf.lstrip()
        if not self.shown and self.names and (start.startswith(("{", "```")) or (start and "```".startswith(start))):
            self.in_call, self.held = True, buf
            return ""
        if not self.shown and not start:
            self.held = buf
            return ""
        keep = next((k for k in range(min(len(OPEN) - 1, len(buf)), 0, -1) if buf.endswith(OPEN[:k])), 0)
        self.held = buf[len(buf) - keep :] if keep else ""
        return self._show(buf[: len(buf) - keep])

    def _show(self, text: str) -> str:
        self.shown = self.shown or bool(text)
        return text

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(text not yet shown, calls). Text around and between blocks is kept as text."""
        rest, self.held = self.held, ""
        if not self.in_call:
            return rest, []
        if OPEN not in rest:
            return self._bare(rest)
        calls, text = [], []
        while rest:
            i = rest.find(OPEN)
            if i < 0:
                text.append(rest)
                break
            text.append(rest[:i])
            j = rest.find(CLOSE, i)
            body = rest[i + len(OPEN) : j if j >= 0 else len(rest)]
            try:
                calls.append(parse_call(body))
            except (ValueError, json.JSONDecodeError):
                text.append(rest[i : j + len(CLOSE) if j >= 0 else len(rest)])
            rest = rest[j + len(CLOSE) :] if j >= 0 else ""
        return "".join(text).strip() if calls else "".join(text), calls

    def _bare(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip()
        fence = re.fullmatch(r"```[a-zA-Z]*\s*(.*?)\s*```", body, re.DOTALL)
        try:
            call = parse_call(fence.group(1) if fence else body)
        except (ValueError, json.JSONDecodeError):
            return text, []
        return ("", [call]) if call.name in self.names else (text, [])


def openai_tools(tools: Any, where: str = "tools") -> list:
    """Validate OpenAI `tools` ([{"type": "function", "function": {...}}]); the template reads them as is."""
    from .protocol import bad

    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad(f"'{where}' must be a list", where)
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"{where}[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}", where)
        if t.get("type", "function") != "function":
            raise bad(f"{where}[{i}]: only 'function' tools are supported", where)
        out.append({"type": "function", "function": fn})
    return out
