"""Quantized KV caches: mlx-lm's settings (`kv_bits`, `kv_group_size`, `quantized_kv_start`) checked once,
and the one rule that applies them: a layer's cache becomes quantized when it holds `quantized_kv_start`
tokens (mlx-lm's `maybe_quantize_kv_cache`, run after every forward). The quantized cache classes are
mlx-lm's `QuantizedKVCache`, our `QuantizedDCAKVCache` (models/kv_cache.py) and, for batches,
`QuantizedBatchKVCache` below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.cache import BatchKVCache

from .kv_budget import AUTO_BITS, auto_start
from .settings import check_kv


@dataclass(frozen=True)
class KVQuantization:
    bits: int
    group_size: int = 64
    start: int = 0
    auto: bool = False  # kv_bits="auto": `start` is where the float cache would pass the memory budget

    @classmethod
    def make(
        cls,
        kv_bits: Any,
        kv_group_size: int = 64,
        quantized_kv_start: int = 0,
        model: Any = None,
        memory_budget: Any = None,
    ) -> Optional[KVQuantization]:
        """The settings, checked (ValueError naming the argument), or None when `kv_bits` is None.

        `kv_bits="auto"` becomes 8 bits from the token count at which this model's float cache would pass
        `memory_budget` (kv_budget.py), so the switch is mlx-lm's `quantized_kv_start` rule."""
        if kv_bits is None:
            return None
        check_kv(kv_bits, kv_group_size, quantized_kv_start, memory_budget)
        head_dim = getattr(getattr(model, "args", None), "head_dim", None)
        if head_dim is not None and head_dim % kv_group_size:
            raise ValueError(f"kv_group_size {kv_group_size} does not divide the model's head size {head_dim}")
        if kv_bits == "auto":
            if model is None:
                raise ValueError("kv_bits='auto' needs the model, to size its cache against the memory budget")
            return cls(AUTO_BITS, kv_group_size, max(quantized_kv_start, auto_start(model, memory_budget)), True)
        return cls(kv_bits, kv_group_size, quantized_kv_start)

    def apply(self, cache: list) -> None:
        """Quantize, in place in the list, the layers that reached `start` tokens (others stay as they are)."""
        maybe_quantize_kv_cache(cache, self.start, self.group_size, self.bits)

    def to_dict(self) -> dict:
        return {"kv_bits": self.bits, "kv_group_size": self.group_size, "quantized_kv_start": self.start}


def quantizer(kv: Optional[KVQuantization]):
    """The after-forward hook generation loops call on their caches (a no-op without quantization)."""
    return kv.apply if kv is not None else (lambda cache: None)


def cache_bits(cache: list) -> Optional[int]:
    """The bits of a cache's quantized layers, None when every layer holds floats."""
    return next((c.bits for c in cache if hasattr(c, "bits")), None)


class QuantizedBatchKVCache(BatchKVCache):
    """mlx-lm's BatchKVCache (left-padded rows, `filter` as rows finish) holding quantized keys and values.

    mlx-lm has no quantized batch cache; the attention needs only `bits`/`group_size` to take mlx-lm's
    quantized SDPA, which applies the batch's array mask as given.
    """

    def __init__(self, left_padding: list, group_size: int = 64, bits: int = 8):
        super().__init__(left_padding)
        self.group_size, self.bits = group_size, bits

    @classmethod
    def from_batch(cls, c: BatchKVCache, group_size: int, bits: int) -> QuantizedBatchKVCache:
        q = cls([], group_size, bits)
        q.left_padding, q.offset, q._idx = c.left_padding, c.offset, c._idx
        if c.keys is not None:
            k, v = c.keys[..., : c._idx, :], c.values[..., : c._idx, :]
            q.keys = mx.quantize(k, group_size=group_size, bits=bits)
            q.values = mx.quantize(v, group_size=group_size, bits=bits)
        return q

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev, n = self._idx, keys.shape[2]
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            steps = (self.step + n - 1) // self.step * self.step
            k, v = (self._quantize(mx.zeros((*x.shape[:2], steps, x.shape[3]), x.dtype)) for x in (keys, values))
            if self.keys is None:
                self.keys, self.values = k, v
            else:
                self.keys, self.values = (
                    tuple(mx.concatenate([a[..., :prev, :], b], axis=2) for a, b in zip(old, new))
                    for old, new in ((self.keys, k), (self.values, v))
                )
        self.offset = self.offset + n
        self._idx += n
        for stored, new in ((self.keys, keys), (self.values, values)):
            for s, x in zip(stored, self._quantize(new)):
                s[..., prev : self._idx, :] = x
        return self.keys_and_values()

    def _quantize(self, x: mx.array) -> tuple:
        return mx.quantize(x, group_size=self.group_size, bits=self.bits)

    def keys_and_values(self):
        return tuple(tuple(t[..., : self._idx, :] for t in x) for x in (self.keys, self.values))

    def filter(self, batch_indices) -> None:
        if self.keys is not None:
            self.keys, self.values = (tuple(t[batch_indices] for t in x) for x in (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())  # rows that left may free columns of padding
        if shift > 0:
            if self.keys is not None:
                self.keys, self.values = (tuple(t[..., shift:, :] for t in x) for x in (self.keys, self.values))
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other) -> None:
        """New rows join the batch (mlx-lm's `BatchKVCache.extend`): both sides right-aligned at the longer
        one's column, the shorter side's new columns left padding. Float rows are quantized first."""
        if type(other) is BatchKVCache:
            other = QuantizedBatchKVCache.from_batch(other, self.group_size, self.bits)
        if (other.group_size, other.bits) != (self.group_size, self.bits):
            raise ValueError(
                f"cannot join a {other.bits}-bit (group {other.group_size}) batch cache to a "
                f"{self.bits}-bit (group {self.group_size}) one"
            )
        idx = max(self._idx, other._idx)
        like = self if self.keys is not None else other
        if like.keys is not None:
            self.keys, self.values = (
                tuple(mx.concatenate(parts) for parts in zip(*(c._aligned(which, idx, like) for c in (self, other))))
                for which in ("keys", "values")
            )
        self.left_padding = mx.concatenate([self.left_padding + idx - self._idx, other.left_padding + idx - other._idx])
        self.offset = mx.concatenate([self.offset, other.offset])
        self._idx = idx

    def _aligned(self, which: str, idx: int, like: QuantizedBatchKVCache) -> tuple:
        """This cache's keys or values cut to `_idx` columns and left-padded with zeros to `idx`."""
        B = self.left_padding.shape[0]
        stored = getattr(self, which)
        if stored is None:  # no columns yet: zeros shaped like the other side's
            stored = tuple(mx.zeros((B, *t.shape[1:2], 0, t.shape[3]), t.dtype) for t in getattr(like, which))
        pad = [(0, 0), (0, 0), (idx - self._idx, 0), (0, 0)]
        return tuple(mx.pad(t[..., : self._idx, :], pad) for t in stored)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for x in (self.keys or (), self.values or ()) for t in x)


def quantize_batch_cache(cache: list, kv: Optional[KVQuantization]) -> None:
    """The batch form of `KVQuantization.apply`: layers holding `start` columns become quantized."""
    if kv is None:
        return
    for i, c in enumerate(cache):
        if type(c) is BatchKVCache and c._idx >= kv.start:
            cache[i] = QuantizedBatchKVCache.from_batch(c, kv.group_size, kv.bits)
