"""The server's prefix cache on disk, so a long system prompt or repository survives a restart.

mlx-lm's `LRUPromptCache` keeps conversations in memory only. This folder keeps each finished
request's KV cache of at least `min_tokens` tokens as a `CacheStore` file (generation/cache_store.py:
tagged with the model, its weights' fingerprint, dtype, long-context and KV-quantization settings
and the token ids it holds; written under a temporary name and renamed; evicted least recently used
past a byte budget). An index of each file's token ids (read from the headers at start) finds the
file sharing the longest prefix with a new prompt; it is loaded into the in-memory cache only when
it beats what memory has. A file that is truncated, damaged, stale or made for other settings is
deleted and never used, so it costs a full prefill, never a wrong reply.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Union

from qwen2_mlx.generation.cache_store import CacheStore
from qwen2_mlx.generation.prompt_cache import can_trim_prompt_cache

log = logging.getLogger("qwen2_mlx.serve")
MIN_TOKENS = 256  # shorter prompts are read again in well under a second: not worth a file
PREFIX = "prefix-"


def _common(a: list, b: list) -> int:
    return len(os.path.commonprefix([a, b]))  # works on any sequences, token lists included


class DiskPrefixCache:
    """A folder of prefix caches for one model and its settings (`validity`); engine-thread only."""

    def __init__(self, root: Union[str, Path], validity: dict, model, budget: int, min_tokens: int = MIN_TOKENS):
        self.store = CacheStore(root, budget)
        self.validity, self.model, self.min_tokens = validity, model, min_tokens
        self.index: dict[str, list] = {}
        for key, _, _ in self.store.entries():  # other models' files share the folder and its budget
            head = self.store.peek(key) if key.startswith(PREFIX) else None
            if head is not None and head[0] == validity and head[1]:
                self.index[key] = head[1]
        self.loaded = self.written = 0  # counts, for /health

    @staticmethod
    def key(tokens: list) -> str:
        return PREFIX + hashlib.sha256(repr(list(tokens)).encode()).hexdigest()[:32]

    def load_into(self, memory, model_name: str, prompt: list, have: int) -> bool:
        """Load the file sharing the longest prefix with `prompt` into `memory` (an LRUPromptCache) if it
        holds more than the `have` tokens memory gave. Returns whether one was loaded."""
        cap = len(prompt) - 1  # the last prompt token is always read again (it gives the first logits)
        ranked = sorted(((min(_common(t, prompt), cap), k) for k, t in self.index.items()), reverse=True)
        for shared, key in ranked:
            if shared <= max(have, self.min_tokens - 1):
                return False
            got = self.store.load(key, self.validity, self.model)
            if got.ok:
                memory.insert_cache(model_name, list(got.tokens), got.cache)
                self.loaded += 1
                return True
            log.warning("prefix cache %s ignored: %s", self.store.path(key), got.reason)
            if got.status == "mismatch":  # another server's settings: its file, not ours to delete
                self.index.pop(key, None)
            else:
                self._forget(key)
        return False

    def keep(self, tokens: list, cache) -> None:
        """Write a finished request's cache (holding exactly `tokens`) unless a file already covers it."""
        if len(tokens) < self.min_tokens or self.store.budget <= 0:
            return
        trimmable = can_trim_prompt_cache(cache)
        if any(len(t) >= len(tokens) and t[: len(tokens)] == tokens for t in self.index.values()):
            return
        key = self.key(tokens)
        saved = self.store.save(key, cache, list(tokens), self.validity, self.model)
        if not saved.written:
            log.warning("prefix cache not written: %s", saved.reason)
            return
        self.written += 1
        self.index[key] = list(tokens)
        for k in saved.evicted:
            self.index.pop(k, None)
        if trimmable:  # a file holding a prefix of these tokens serves nothing this one cannot
            for k, t in list(self.index.items()):
                if k != key and len(t) < len(tokens) and tokens[: len(t)] == t:
                    self._forget(k)

    def _forget(self, key: str) -> None:
        self.store.delete(key)
        self.index.pop(key, None)


def default_dir() -> Path:
    """`$XDG_DATA_HOME/qwen2-mlx/serve-cache` (or the platform's data folder)."""
    from qwen2_mlx.loading.paths import data_dir

    return data_dir() / "serve-cache"


__all__ = ["DiskPrefixCache", "default_dir", "MIN_TOKENS"]
