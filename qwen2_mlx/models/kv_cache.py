"""The KV cache of Dual Chunk Attention layers (plain layers use mlx-lm's `KVCache` as is)."""

from __future__ import annotations

from typing import Optional

from mlx_lm.models.cache import KVCache


class DCAKVCache(KVCache):
    """mlx-lm's KVCache for Dual Chunk Attention layers.

    The storage and trimming are KVCache's; what differs is what goes in: keys rotated at `j mod c`
    and scaled by the DCA temperature at write time (docs/long-context.md §6), so they never need re-rotating.
    Such keys are plain RoPE keys only for `j < c`: the DCA settings travel in `meta_state` and a
    model configured differently refuses the cache.

    `length_hint` is the total length the current prompt will reach; stepwise prefill uses it so
    every prompt key gets the temperature of the whole prompt, as in vLLM (docs/long-context.md §5).
    """

    def __init__(self, chunk_size: int = 0, local_size: int = 0, original_max_position_embeddings: int = 0):
        super().__init__()
        self.chunk_size = chunk_size
        self.local_size = local_size
        self.original_max_position_embeddings = original_max_position_embeddings
        self.length_hint = 0

    @property
    def meta_state(self) -> tuple:
        return tuple(str(v) for v in self.dca_settings)

    @meta_state.setter
    def meta_state(self, v) -> None:
        self.chunk_size, self.local_size, self.original_max_position_embeddings = (int(x) for x in v)

    @property
    def dca_settings(self) -> tuple:
        return (self.chunk_size, self.local_size, self.original_max_position_embeddings)

    @classmethod
    def from_state(cls, state, meta_state: Optional[tuple] = None) -> DCAKVCache:
        obj = cls()
        obj.state = state
        if meta_state:
            obj.meta_state = meta_state
        return obj

    def trim(self, n: int) -> int:
        n = super().trim(n)
        self.length_hint = 0  # the prompt it described is gone
        return n
