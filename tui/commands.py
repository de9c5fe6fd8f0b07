"""Slash commands typed into the prompt: parsing and validating their arguments.

Which commands exist, what each does and its help text are the table in `slash.py`.

Names follow ollama / lms / llama-cli (`/set temp 0.7`, `/system`, `/regen`, `/clear`), so users
coming from those tools find them where they expect.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Optional

# Accepted spellings of each setting, and how to read its value.
ALIASES = {
    "temp": "temperature",
    "temperature": "temperature",
    "t": "temperature",
    "top_p": "top_p",
    "topp": "top_p",
    "top-p": "top_p",
    "top_k": "top_k",
    "topk": "top_k",
    "top-k": "top_k",
    "min_p": "min_p",
    "minp": "min_p",
    "min-p": "min_p",
    "rep": "repetition_penalty",
    "repeat_penalty": "repetition_penalty",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "max": "max_tokens",
    "max_tokens": "max_tokens",
    "num_predict": "max_tokens",
    "context": "context_policy",
    "context_policy": "context_policy",
    "lookup": "lookup",
    "kv-bits": "kv_bits",
    "kv_bits": "kv_bits",
    "kvbits": "kv_bits",
    "cache-disk": "cache_disk",
    "cache_disk": "cache_disk",
    "cachedisk": "cache_disk",
}
SWITCH = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}
POLICIES = ("refuse", "drop_oldest")


class CommandError(ValueError):
    """A slash command that cannot be carried out; the message says why, for the user."""


@dataclass
class Command:
    name: str
    arg: str = ""
    key: Optional[str] = None
    value: Any = None


def parse_setting(key: str, raw: str) -> tuple[str, Any]:
    """Validate one sampling setting; returns (canonical key, value)."""
    name = ALIASES.get(key.lower())
    if name is None:
        raise CommandError(
            f"unknown setting {key!r}: use temp, top_p, top_k, min_p, rep, seed, max, context, lookup, "
            "kv-bits or cache-disk"
        )
    raw = raw.strip()
    if name == "kv_bits":  # KV-cache quantization: 4 or 8 bits, or a float cache
        if raw.lower() in ("off", "none", "no", "0", "16", "32"):
            return name, None
        if raw not in ("4", "8"):
            raise CommandError(f"kv-bits must be 4, 8 or off, not {raw!r}")
        return name, int(raw)
    if name == "cache_disk":  # the disk budget of the chat caches, for all chats
        from qwen2_mlx.generation.cache_store import parse_size

        try:
            return name, parse_size(raw)
        except ValueError as e:
            raise CommandError(f"cache-disk: {e}") from None
    if name == "lookup":  # prompt-lookup speculative decoding, exact: only the speed changes
        if raw.lower() not in SWITCH:
            raise CommandError(f"lookup must be on or off, not {raw!r}")
        return name, SWITCH[raw.lower()]
    if name == "context_policy":
        if raw not in POLICIES:
            raise CommandError(f"context must be one of {', '.join(POLICIES)}, not {raw!r}")
        return name, raw
    if raw.lower() in ("none", "off", "default", "") and name in ("seed", "max_tokens", "repetition_penalty"):
        return name, None
    try:
        value: Any = int(raw) if name in ("top_k", "seed", "max_tokens") else float(raw)
    except ValueError:
        kind = "a whole number" if name in ("top_k", "seed", "max_tokens") else "a number"
        raise CommandError(f"{key} needs {kind}, not {raw!r}") from None
    ranges = {
        "temperature": (0.0, 10.0),
        "top_p": (0.0, 1.0),
        "min_p": (0.0, 1.0),
        "top_k": (0, 1 << 20),
        "repetition_penalty": (0.01, 10.0),
        "max_tokens": (1, 1 << 30),
        "seed": (0, 2**63 - 1),
    }
    lo, hi = ranges[name]
    if not lo <= value <= hi:
        raise CommandError(f"{key} must be between {lo:g} and {hi:g}, not {raw}")
    return name, value


def parse(text: str) -> Optional[Command]:
    """A Command for text starting with '/', None for an ordinary message.

    The name is not checked here (`slash.find` does that); the arguments of /set, /max, /export,
    /rename and /copy are.

    A leading '//' sends the rest as a message starting with '/' (returns None; see `unescape`).
    """
    if not text.startswith("/") or text.startswith("//"):
        return None
    head, _, rest = text[1:].partition(" ")
    name = head.strip().lower()
    rest = rest.strip()
    if name == "set":
        key, _, raw = rest.partition(" ")
        if not key or not raw.strip():
            raise CommandError("usage: /set KEY VALUE, e.g. /set temp 0.7")
        k, v = parse_setting(key, raw)
        return Command("set", rest, k, v)
    if name == "max":
        if not rest:
            raise CommandError("usage: /max N (or /max none)")
        k, v = parse_setting("max", rest)
        return Command("set", rest, k, v)
    if name == "export":
        parts = rest.split(maxsplit=1)
        fmt = "md"
        if parts and parts[0].lower() in ("md", "markdown", "jsonl", "json"):
            fmt = "jsonl" if parts[0].lower().startswith("json") else "md"
            parts = parts[1:]
        return Command("export", parts[0] if parts else "", "format", fmt)
    if name == "file":
        try:
            paths = shlex.split(rest)
        except ValueError as e:
            raise CommandError(f"/file: {e} (quote paths with spaces)") from None
        if not paths:
            raise CommandError("usage: /file PATH… (files, folders or PDFs), or /file clear")
        return Command("file", rest, "paths", "clear" if paths == ["clear"] else paths)
    if name == "rename" and not rest:
        raise CommandError("usage: /rename TITLE")
    if name == "copy" and rest not in ("", "code"):
        raise CommandError("usage: /copy or /copy code")
    return Command(name, rest)


def unescape(text: str) -> str:
    """'//text' is sent as '/text'."""
    return text[1:] if text.startswith("//") else text
