"""The chat file format: a chat's messages with their branches and its settings as JSON, the KV cache beside it.

`write_chat` writes under a temporary name and renames, so a crash never leaves half a file;
`read_chat` checks every field and says which one is wrong (`ChatFileError` naming file and field).
Version 1: {"format": "qwen2-mlx-chat", "version": 1, "system", "context_policy", "max_context",
"sampling", "messages" (the tree), "active", "dropped", "kv_cache", "cache": {"file", "tokens"} or null}.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from .history import Node, validate_message
from .prompt_cache import CacheIgnored, PromptCacheError, load_prompt_cache, save_prompt_cache
from .settings import KV_KEYS, SAMPLING_KEYS

FILE_FORMAT = "qwen2-mlx-chat"
FILE_VERSION = 1


class ChatFileError(ValueError):
    """A saved chat that cannot be loaded; the message names the file and the field."""


def write_chat(chat, path: Path, include_cache: bool) -> None:
    """Write `chat` (a `Chat`) to `path`; its KV cache to `<name>.kv.safetensors` beside it when asked."""
    data = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "system": chat.system,
        "context_policy": chat.context_policy,
        "max_context": chat.max_context,
        "sampling": _json_sampling(chat.sampling),
        "messages": [c.to_dict() for c in chat._tree.root.children],
        "active": chat._tree.root.active,
        "dropped": chat.dropped,
        "kv_cache": chat.kv_settings,
        "cache": None,
    }
    caches = chat._caches
    if include_cache and caches.cache is not None and caches.tokens:
        cache_path = path.with_name(path.stem + ".kv.safetensors")
        save_prompt_cache(cache_path, caches.cache, model=chat.model, tokens=caches.tokens)
        data["cache"] = {"file": cache_path.name, "tokens": list(caches.tokens)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_sampling(sampling: dict) -> dict:
    out = dict(sampling)
    if out.get("logit_bias"):
        out["logit_bias"] = {str(k): v for k, v in out["logit_bias"].items()}
    try:
        json.dumps(out)
    except TypeError as e:
        raise TypeError(f"chat.sampling must hold plain values to be saved ({e})") from None
    return out


def read_chat(chat_class, path: Path, model, tokenizer):
    """A `chat_class` (Chat) from a file `write_chat` wrote; its KV cache too when one was saved."""
    data = _read_json(path)
    sampling, kv = _settings_from(data, path)
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise _bad(path, "system", "must be a string or null")
    try:
        chat = chat_class(
            model,
            tokenizer,
            system=system,
            context_policy=data.get("context_policy", "refuse"),
            max_context=data.get("max_context"),
            **kv,
            **sampling,
        )
    except (ValueError, TypeError) as e:
        raise ChatFileError(f"{path}: {e}") from None
    tree = chat._tree
    tree.root.children = [_node_from(m, path, f"messages[{i}]") for i, m in enumerate(data.get("messages") or [])]
    tree.root.active = _active_from(data, len(tree.root.children), path, "active")
    dropped = data.get("dropped") or []
    for i, m in enumerate(dropped):
        _checked(validate_message, m, f"dropped[{i}]", path)
    tree.dropped = list(dropped)
    cache = data.get("cache")
    if cache:
        try:
            chat._caches.cache, chat._caches.tokens = _cache_from(cache, path, model)
        except PromptCacheError as e:  # the messages are sound: keep them, never use what cannot be proved
            warnings.warn(CacheIgnored(e), stacklevel=3)
    return chat


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatFileError(f"{path}: no such chat file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        raise ChatFileError(f'{path}: not a qwen2-mlx chat file (no "format": "{FILE_FORMAT}")')
    if data.get("version") != FILE_VERSION:
        raise _bad(path, "version", f"{data.get('version')!r} is not supported (expected {FILE_VERSION})")
    return data


def _bad(path: Path, field_name: str, problem: str) -> ChatFileError:
    return ChatFileError(f"{path}: field '{field_name}': {problem}")


def _settings_from(data: dict, path: Path) -> tuple[dict, dict]:
    """The file's sampling settings and KV-cache quantization, as keyword arguments."""
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, dict) or any(k not in SAMPLING_KEYS for k in sampling):
        raise _bad(path, "sampling", f"must be an object with keys among {', '.join(SAMPLING_KEYS)}")
    if sampling.get("logit_bias"):
        try:
            sampling["logit_bias"] = {int(k): float(v) for k, v in sampling["logit_bias"].items()}
        except (ValueError, TypeError, AttributeError):
            raise _bad(path, "sampling.logit_bias", "must map token ids to numbers") from None
    kv = data.get("kv_cache") or {}
    if not isinstance(kv, dict) or any(k not in KV_KEYS for k in kv):
        raise _bad(path, "kv_cache", f"must be an object with keys among {', '.join(KV_KEYS)}")
    return sampling, kv


def _cache_from(cache: Any, path: Path, model) -> tuple[list, list[int]]:
    if (
        not isinstance(cache, dict)
        or not isinstance(cache.get("file"), str)
        or not isinstance(cache.get("tokens"), list)
    ):
        raise _bad(path, "cache", "must be an object with 'file' and 'tokens'")
    cache_path = path.with_name(cache["file"])
    kv = load_prompt_cache(cache_path, model=model, tokens=cache["tokens"])  # PromptCacheError names the file
    if getattr(kv[0], "offset", None) != len(cache["tokens"]):
        raise PromptCacheError(
            f"{cache_path}: holds {getattr(kv[0], 'offset', '?')} tokens, {path} lists {len(cache['tokens'])}"
        )
    return kv, [int(t) for t in cache["tokens"]]


def _checked(check, value: Any, where: str, path: Path):
    try:
        return check(value, where)
    except ValueError as e:
        raise ChatFileError(f"{path}: {e}") from None


def _active_from(d: dict, n: int, path: Path, where: str) -> int:
    active = d.get("active", 0)
    if not isinstance(active, int) or not (0 <= active < max(n, 1)):
        raise ChatFileError(f"{path}: field '{where}': {active!r} is not an index of the {n} alternatives")
    return active


def _node_from(d: Any, path: Path, where: str) -> Node:
    role, content = _checked(validate_message, d, where, path)
    if role == "system":
        raise ChatFileError(f"{path}: {where}: the system prompt belongs in the 'system' field")
    children = d.get("children") or []
    if not isinstance(children, list):
        raise ChatFileError(f"{path}: field '{where}.children': must be a list")
    node = Node(role, content, finish_reason=d.get("finish_reason"), stats=d.get("stats"))
    node.children = [_node_from(c, path, f"{where}.children[{i}]") for i, c in enumerate(children)]
    node.active = _active_from(d, len(node.children), path, f"{where}.active")
    return node
