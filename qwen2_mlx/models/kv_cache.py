"""The KV caches of Dual Chunk Attention layers (plain layers use mlx-lm's `KVCache` as is)."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache

# How attention reads a quantized cache. MLX's CPU quantized matmul is ~13x slower than dequantizing and
# using BLAS (float32, 8 bits: 5.2 s vs 0.38 s for 3,584 query rows over 8,192 keys; 9.7 ms vs 0.8 ms for
# one decode row), so on the CPU each layer's keys and values are dequantized when read, which costs
# one layer's float copy at a time. Metal reads them as stored. Tests set this to run both paths anywhere.
QUANTIZED_READS_ON_CPU = False


def dequantize_reads(on_cpu: bool, on_cuda: bool, quantized_reads_on_cpu: bool = False) -> bool:
    """The rule: dequantize on the CPU (speed, unless the flag says otherwise) and on CUDA, never on Metal.
    MLX 0.32's CUDA quantized matmul (backend/cuda/quantized/qmm/qmm.cu) has kernels only for packed
    matrices contiguous as a whole, and attention reads `keys[..., :offset, :]` views of a cache's buffer:
    on an H200 every read the suite made failed ("No implementation for problem shape", head sizes 32 and
    64, 4 and 8 bits). Python cannot see contiguity, so the rule is per device; dequantize takes views."""
    return not quantized_reads_on_cpu if on_cpu else on_cuda


def reads_dequantized() -> bool:
    """Whether attention dequantizes a quantized cache before reading it (see dequantize_reads)."""
    on_cpu = mx.default_device().type == mx.cpu
    return dequantize_reads(on_cpu, not on_cpu and mx.cuda.is_available(), QUANTIZED_READS_ON_CPU)


class _DCASettings:
    """What DCA caches add to mlx-lm's: the geometry their keys were written for, and `length_hint`.

    Keys are rotated at `j mod c` and scaled by the DCA temperature at write time (docs/long-context.md §6),
    so they never need re-rotating. Such keys are plain RoPE keys only for `j < c`: the DCA settings
    travel in `meta_state` and a model configured differently refuses the cache.

    `length_hint` is the total length the current prompt will reach; stepwise prefill uses it so
    every prompt key gets the temperature of the whole prompt, as in vLLM (docs/long-context.md §5).
    """

    chunk_size = local_size = original_max_position_embeddings = length_hint = 0

    def _set_dca(self, chunk_size: int, local_size: int, original_max_position_embeddings: int) -> None:
        self.chunk_size = chunk_size
        self.local_size = local_size
        self.original_max_position_embeddings = original_max_position_embeddings
        self.length_hint = 0

    @property
    def dca_settings(self) -> tuple:
        return (self.chunk_size, self.local_size, self.original_max_position_embeddings)

    @property
    def meta_state(self) -> tuple:
        return tuple(str(v) for v in self.dca_settings)

    @meta_state.setter
    def meta_state(self, v) -> None:
        self._set_dca(*(int(x) for x in v))

    @classmethod
    def from_state(cls, state, meta_state: Optional[tuple] = None):
        obj = cls()
        obj.state = state
        if meta_state:
            obj.meta_state = meta_state
        return obj

    def trim(self, n: int) -> int:
        n = super().trim(n)
        self.length_hint = 0  # the prompt it described is gone
        return n


class DCAKVCache(_DCASettings, KVCache):
    """mlx-lm's KVCache for Dual Chunk Attention layers: the storage and trimming are KVCache's."""

    def __init__(self, chunk_size: int = 0, local_size: int = 0, original_max_position_embeddings: int = 0):
        KVCache.__init__(self)
        self._set_dca(chunk_size, local_size, original_max_position_embeddings)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedDCAKVCache:
        """The same keys (already rotated and temperature-scaled) and values, quantized."""
        q = QuantizedDCAKVCache(group_size, bits, *self.dca_settings)
        q.length_hint, q.offset = self.length_hint, self.offset
        if self.keys is not None:  # spare room too, as mlx-lm's: sliced, the next token would copy it all
            q.keys = mx.quantize(self.keys, group_size=group_size, bits=bits)
            q.values = mx.quantize(self.values, group_size=group_size, bits=bits)
        return q


class QuantizedDCAKVCache(_DCASettings, QuantizedKVCache):
    """mlx-lm's QuantizedKVCache for DCA layers: keys are quantized after rotation and scaling, so the
    attention reads them as stored (dca.py's matmuls take the quantized triples directly)."""

    def __init__(
        self,
        group_size: int = 64,
        bits: int = 8,
        chunk_size: int = 0,
        local_size: int = 0,
        original_max_position_embeddings: int = 0,
    ):
        QuantizedKVCache.__init__(self, group_size=group_size, bits=bits)
        self._set_dca(chunk_size, local_size, original_max_position_embeddings)
