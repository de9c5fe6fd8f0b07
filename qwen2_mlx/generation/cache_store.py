"""KV caches that outlive the process: a folder of per-key cache files with a disk budget.

A front end (the chat app, a server) saves the KV cache of a conversation under a key (a chat id)
and loads it back after a restart, so only the new suffix is prefilled. Each file is a prompt cache
(prompt_cache.py's layout, written streaming to a temporary name and renamed) whose metadata holds
the token ids the cache holds and what makes it valid: the model (folder and a fingerprint of its
weight files), dtype, shape and long-context settings, and the KV-cache quantization. `load`
returns the cache or says why it was ignored (missing, truncated, corrupt, stale, made for other
settings); it never raises for a bad file. Least-recently-used files (by mtime, touched on load)
are evicted past the byte budget. Which cached tokens a new prompt reuses stays Chat's decision.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cache_integrity import IntegrityError, check_layers, model_dtype
from .prompt_cache import PromptCacheError, cache_nbytes, load_prompt_cache, model_signature, save_prompt_cache

FORMAT = 2  # 2: files carry a checksum and are checked layer by layer (cache_integrity.py)
VALIDITY_KEY = "qwen2_mlx_cache_store"
TOKENS_KEY = "qwen2_mlx_tokens"
SUFFIX = ".safetensors"
DEFAULT_BUDGET = 4_000_000_000  # 4 GB: ~20 chats of 8K tokens with a 7B model in float16
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TEMP_RE = re.compile(r"^\..+\.(\d+)\.tmp\.safetensors$")  # prompt_cache's temporary names: .<name>.<pid>.tmp…


def weights_fingerprint(folder: Union[str, Path]) -> str:
    """What changes when a model folder's weights or config change: name, size and mtime of each file."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted([*folder.glob("*.safetensors"), folder / "config.json"]):
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_validity(
    model: nn.Module,
    model_path: Union[str, Path, None] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: Optional[int] = None,
    quantized_kv_start: Optional[int] = None,
    dtype: Optional[str] = None,
) -> dict:
    """What a stored cache must agree on to be loaded for `model`; JSON-plain, compared field by field.

    Without `kv_bits` the cache is not quantized, so the group size and start are recorded as None.
    """
    path = Path(model_path).expanduser().resolve() if model_path is not None else None
    return json.loads(
        json.dumps(
            {
                "format": FORMAT,
                "model": str(path) if path is not None else None,
                "weights": weights_fingerprint(path) if path is not None else None,
                "dtype": dtype or model_dtype(model),
                "kv_bits": kv_bits,
                "kv_group_size": kv_group_size if kv_bits else None,
                "quantized_kv_start": quantized_kv_start if kv_bits else None,
                **model_signature(model),
            },
            sort_keys=True,
        )
    )


def chat_cache_validity(chat: Any, model_path: Union[str, Path, None] = None, dtype: Optional[str] = None) -> dict:
    """`cache_validity` for a `Chat`: its model and KV-cache quantization (`chat.kv_settings`)."""
    kv = getattr(chat, "kv_settings", None) or {
        k: getattr(chat, k, None) for k in ("kv_bits", "kv_group_size", "quantized_kv_start")
    }
    return cache_validity(
        chat.model,
        model_path,
        kv_bits=kv.get("kv_bits"),
        kv_group_size=kv.get("kv_group_size"),
        quantized_kv_start=kv.get("quantized_kv_start"),
        dtype=dtype,
    )


@dataclass
class Loaded:
    """What `CacheStore.load` found: the cache and its tokens, or (`cache` None) why it was ignored."""

    key: str
    cache: Optional[list] = None
    tokens: list = field(default_factory=list)
    status: str = "loaded"  # "loaded" | "missing" | "truncated" | "corrupt" | "stale" | "mismatch"
    reason: str = ""  # one line for the user when ignored
    seconds: float = 0.0
    nbytes: int = 0

    @property
    def ok(self) -> bool:
        return self.cache is not None


@dataclass
class Saved:
    """What `CacheStore.save` did: written (with its size), or why not; and what it evicted."""

    key: str
    written: bool
    nbytes: int = 0
    reason: str = ""
    evicted: list = field(default_factory=list)
    seconds: float = 0.0


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of `path` and the file size it implies; raises ValueError if unreadable."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise EOFError("shorter than a header")
        (n,) = struct.unpack("<Q", raw)
        if n > 512 << 20:
            raise ValueError("implausible header length")
        head = f.read(n)
    if len(head) < n:
        raise EOFError("the header is cut short")
    header = json.loads(head)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return header, 8 + n + end


class CacheStore:
    """A folder of KV-cache files, one per key, under a byte budget (see the module docstring).

    Not thread-safe by itself: call it from one thread (the one that owns the MLX arrays).
    """

    def __init__(self, root: Union[str, Path], budget: int = DEFAULT_BUDGET):
        self.root = Path(root)
        self.budget = int(budget)
        self._clean_temp()

    def path(self, key: str) -> Path:
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise ValueError(f"cache key {key!r}: use letters, digits, '.', '_' or '-' (at most 128)")
        return self.root / f"{key}{SUFFIX}"

    # --- reading -------------------------------------------------------------------------------
    def load(self, key: str, validity: dict, model: Optional[nn.Module] = None) -> Loaded:
        """The cache stored under `key` if it is whole and `validity` matches; else why not."""
        tic = time.perf_counter()
        path = self.path(key)

        def ignored(status: str, reason: str) -> Loaded:
            return Loaded(key, status=status, reason=reason, seconds=time.perf_counter() - tic)

        if not path.is_file():
            return ignored("missing", "no cache saved for it")
        try:
            size = path.stat().st_size
            header, expected = _read_header(path)
            meta = header.get("__metadata__") or {}
            # mlx-lm's layout flattens [metadata, classes, scalars]: the user metadata is under "0."
            saved = json.loads(meta[f"0.{VALIDITY_KEY}"])
            tokens = json.loads(meta[f"0.{TOKENS_KEY}"])
        except EOFError:
            return ignored("truncated", "the file is truncated")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return ignored("corrupt", f"the file is damaged ({type(e).__name__})")
        if size < expected:
            return ignored("truncated", f"the file is truncated ({size:,} of {expected:,} bytes)")
        if not isinstance(saved, dict) or not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return ignored("corrupt", "the file's metadata is damaged")
        why = _differs(saved, validity)
        if why is not None:
            return ignored(*why)
        lengths = {v["shape"][2] for k, v in header.items() if k != "__metadata__" and len(v.get("shape", [])) == 4}
        if lengths and lengths != {len(tokens)}:  # before the checksum: this reason says more
            return ignored(
                "corrupt", f"the file holds {'/'.join(map(str, sorted(lengths)))} tokens but lists {len(tokens)}"
            )
        try:
            cache = load_prompt_cache(path, model=model, require_checksum=True)
            mx.eval([a for c in cache for _, a in tree_flatten(c.state) if isinstance(a, mx.array)])
        except (PromptCacheError, RuntimeError, ValueError, KeyError, TypeError) as e:
            return ignored("corrupt", f"the file is damaged ({_reason(e, path)})")
        held = getattr(cache[0], "offset", None) if cache else None
        if held != len(tokens):
            return ignored("corrupt", f"the file holds {held} tokens but lists {len(tokens)}")
        if model is not None:
            try:
                check_layers(cache, model, len(tokens))
            except IntegrityError as e:
                return ignored("corrupt", f"the file is damaged ({e})")
        try:
            os.utime(path)  # least recently used is by mtime
        except OSError:
            pass
        return Loaded(key, cache, tokens, seconds=time.perf_counter() - tic, nbytes=size)

    def peek(self, key: str) -> Optional[tuple[dict, list]]:
        """(validity, token ids) the file under `key` lists, from its header only; None if unreadable."""
        try:
            header, _ = _read_header(self.path(key))
            meta = header.get("__metadata__") or {}
            saved, tokens = json.loads(meta[f"0.{VALIDITY_KEY}"]), json.loads(meta[f"0.{TOKENS_KEY}"])
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if not isinstance(saved, dict) or not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return None
        return saved, tokens

    # --- writing -------------------------------------------------------------------------------
    def save(self, key: str, cache: list, tokens: list, validity: dict, model: Optional[nn.Module] = None) -> Saved:
        """Write `cache` (holding exactly `tokens`) under `key`, then evict past the budget.

        A cache larger than the whole budget is not written (the key's older file, if any, stays).
        """
        tic = time.perf_counter()
        path = self.path(key)
        held = getattr(cache[0], "offset", None) if cache else None
        if held != len(tokens):
            return Saved(
                key, False, reason=f"not saved: the cache holds {held} tokens but {len(tokens)} ids were given"
            )
        need = cache_nbytes(cache)
        if need > self.budget:
            return Saved(key, False, need, f"not saved: {_gb(need)} is over the {_gb(self.budget)} disk budget")
        meta = {VALIDITY_KEY: json.dumps(validity, sort_keys=True), TOKENS_KEY: json.dumps([int(t) for t in tokens])}
        try:
            self._make_root()
            save_prompt_cache(path, cache, metadata=meta, model=model)
        except (OSError, PromptCacheError) as e:
            return Saved(key, False, need, _not_saved(e, path))
        evicted = self.evict(keep=key)
        return Saved(key, True, path.stat().st_size, evicted=evicted, seconds=time.perf_counter() - tic)

    def _make_root(self) -> None:
        """The folder, readable by its owner only (the files hold conversations' token ids)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.root.stat().st_mode & 0o077:
            self.root.chmod(0o700)

    def delete(self, key: str) -> bool:
        try:
            self.path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    # --- the budget ----------------------------------------------------------------------------
    def entries(self) -> list[tuple[str, int, float]]:
        """(key, bytes, last used) of every stored cache, least recently used first."""
        out = []
        if self.root.is_dir():
            for p in self.root.glob(f"*{SUFFIX}"):
                if p.name.startswith("."):
                    continue
                try:
                    st = p.stat()
                except OSError:
                    continue
                out.append((p.name[: -len(SUFFIX)], st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: (e[2], e[0]))

    def usage(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def set_budget(self, budget: int) -> list[str]:
        self.budget = int(budget)
        return self.evict()

    def evict(self, keep: Optional[str] = None) -> list[str]:
        """Delete least-recently-used caches until the rest fit the budget; never `keep`."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        evicted = []
        for key, size, _ in entries:
            if total <= self.budget:
                break
            if key == keep:
                continue
            if self.delete(key):
                evicted.append(key)
            total -= size
        return evicted

    def _clean_temp(self) -> None:
        """Remove temporary files left by a process that died mid-write (never a live writer's)."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            m = TEMP_RE.match(p.name)
            if m and not _alive(int(m.group(1))):
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


LONG_CONTEXT_FIELDS = ("dual_chunk_attention_config", "rope_scaling")


def _long_context(validity: dict) -> str:
    """'DCA chunk 32768, local 4096', 'YaRN x4.0' or 'plain attention', from a validity record."""
    dca, rs = validity.get("dual_chunk_attention_config"), validity.get("rope_scaling")
    if isinstance(dca, dict):
        return f"DCA chunk {dca.get('chunk_size')}, local {dca.get('local_size')}"
    if isinstance(rs, dict):
        return f"RoPE scaling {rs.get('rope_type')} x{rs.get('factor')}"
    return "plain attention"


def _held_lengths(header: dict) -> set:
    """The sequence lengths of the header's key and value tensors ([1, heads, tokens, dim])."""
    shapes = [v.get("shape") if isinstance(v, dict) else None for k, v in header.items() if k != "__metadata__"]
    return {s[2] for s in shapes if isinstance(s, list) and len(s) == 4}


def _differs(saved: dict, validity: dict) -> Optional[tuple[str, str]]:
    """(status, reason) when a file's validity tag does not match the current one; None when it does."""
    diffs = [k for k in sorted(set(saved) | set(validity)) if saved.get(k) != validity.get(k)]
    if not diffs:
        return None
    if "format" in diffs:
        return "stale", "it is stale (it is in an older format)"
    if "model" in diffs:
        return "mismatch", f"it was made for another model ({_show(saved.get('model'))})"
    if "weights" in diffs:
        return "stale", "it is stale (the model's weights changed since it was saved)"
    if set(diffs) <= set(LONG_CONTEXT_FIELDS):  # e.g. saved before long context was on by default
        was, now = _long_context(saved), _long_context(validity)
        return "mismatch", f"it was made with {was} and the model now runs {now}: read again"
    shown = "; ".join(f"{k} {_show(saved.get(k))} in the file, {_show(validity.get(k))} now" for k in diffs)
    return "mismatch", f"it was made for other settings ({shown})"


def _reason(e: Exception, path: Path) -> str:
    """An exception's message without the file's path (the reason is shown next to the chat's name)."""
    text = str(e).removeprefix(f"{path}: ")
    return text[:160] or type(e).__name__


def _not_saved(e: Exception, path: Path) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"not saved: the disk is full ({path.parent}); the previous cache, if any, is kept"
    if isinstance(e, OSError):
        return f"not saved: cannot write {e.filename or path} ({e.strerror or type(e).__name__})"
    return f"not saved: {_reason(e, path)}"


def _show(v: Any) -> str:
    return "off" if v is None else json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def parse_size(text: str) -> int:
    """A byte count from "4GB", "500 MB", "1.5g", "0" or "off" (0: keep no caches on disk)."""
    raw = str(text).strip().lower().replace(" ", "")
    if raw in ("off", "none", "0"):
        return 0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|kb|m|mb|g|gb|t|tb|b)?", raw)
    if not m:
        raise ValueError(f"{text!r} is not a size: use e.g. 4GB, 500MB or off")
    unit = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
    return int(float(m.group(1)) * unit[m.group(2) or ""])


def format_size(n: int) -> str:
    """The inverse of `parse_size` for display: "4GB", "500MB", "off"."""
    if n <= 0:
        return "off"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


__all__ = [
    "CacheStore",
    "Loaded",
    "Saved",
    "cache_validity",
    "chat_cache_validity",
    "weights_fingerprint",
    "model_dtype",
    "parse_size",
    "format_size",
    "DEFAULT_BUDGET",
]
