"""Checkpoints of a long read: the KV cache written to a `CacheStore` while a prompt is prefilled.

A chat's cache file (cache_store.py) is normally written when a reply ends. Reading a long document
can take minutes, so `Checkpointer` is handed the cache and the token ids it holds after each
prefill step and writes them under the chat's key every `every_seconds` (or `every_tokens`), never
spending more than about a tenth of the reading time on writes: after a quit, a crash or a stop,
the next read starts from the last checkpoint. The file is the chat cache's own, with its checks
(model, settings, token ids; written to a temporary name and renamed), so a half-written checkpoint
leaves the previous one in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

from .cache_store import CacheStore

DEFAULT_SECONDS = 20.0
WRITE_SHARE = 0.1  # writes take at most about this share of the reading time


class Checkpointer:
    """Call it with (cache, tokens) after each prefill step; it decides when to write."""

    def __init__(
        self,
        store: CacheStore,
        key: str,
        validity: dict,
        model: Any = None,
        every_seconds: float = DEFAULT_SECONDS,
        every_tokens: Optional[int] = None,
        on_save: Optional[Callable[[list], None]] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store, self.key, self.validity, self.model = store, key, validity, model
        self.every_seconds, self.every_tokens = every_seconds, every_tokens
        self.on_save = on_save  # told the tokens of each written checkpoint
        self.clock = clock
        self.saved = 0  # tokens of the last checkpoint written
        self.writes = 0
        self._last = clock()
        self._gap = every_seconds

    def __call__(self, cache: list, tokens: list) -> bool:
        """Write a checkpoint if one is due; returns whether it wrote."""
        new = len(tokens) - self.saved
        if new <= 0 or self.store.budget <= 0:
            return False
        due_tokens = self.every_tokens is not None and new >= self.every_tokens
        if not due_tokens and self.clock() - self._last < self._gap:
            return False
        tic = self.clock()
        saved = self.store.save(self.key, cache, list(tokens), self.validity, self.model)
        took = self.clock() - tic
        self._last = self.clock()
        self._gap = max(self.every_seconds, took / WRITE_SHARE)  # a slow disk checkpoints less often
        if not saved.written:
            return False
        self.saved, self.writes = len(tokens), self.writes + 1
        if self.on_save is not None:
            self.on_save(list(tokens))
        return True


__all__ = ["Checkpointer", "DEFAULT_SECONDS"]
