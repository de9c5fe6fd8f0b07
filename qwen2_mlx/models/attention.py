"""Grouped-query self-attention of Qwen2: q/k/v with bias, o without, RoPE, fused SDPA.

q, k and v come from one matmul over the three weights stacked (stacked.py), and one RoPE call
rotates q and k together: prefill, decode, batches and verify steps all take this one path.

KV heads are never repeated in memory: `mx.fast.scaled_dot_product_attention` takes the
un-tiled keys and values and handles the GQA group itself (the Metal kernel on a Mac).
With Dual Chunk Attention configured, the same module keeps the fused path while the sequence
has at most `chunk_size + 1` tokens (DCA is plain attention there) and hands longer ones to dca.py.
On the CPU a long prefill step runs the fused call in query tiles (`tiled_attention`), so its peak memory
does not grow with the context.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import BatchKVCache

from .config import ModelArgs
from .dca import DCAGeometry, QuantizedKV, _causal_tail, dca_attention, dca_temperature, plain_keys, rotate_keys
from .kv_cache import DCAKVCache, QuantizedDCAKVCache, reads_dequantized
from .rope import RoPE
from .stacked import StackedProjections

DEQUANT_BLOCK = 1024  # keys a quantized cache is dequantized by, for a few new queries on the CPU
DEQUANT_QUERIES = 16  # up to this many new tokens (decode, speculative verify) take that path
# Scores a CPU prefill tile may hold (128 MB in float32): smaller tiles paid a per-tile overhead.
PLAIN_TILE_SCORES = 1 << 25


def dequantized_attention(q: mx.array, k: tuple, v: tuple, scale: float, group_size: int, bits: int) -> mx.array:
    """Causal attention of the last `L` positions over a quantized cache, `DEQUANT_BLOCK` keys dequantized
    at a time: never a float copy of a layer's whole cache, which mlx-lm's loop (reading the quantized
    cache as stored) never holds either; scores are (heads x L x keys), small for a few queries."""
    B, Hq, L, D = q.shape
    Hkv, N = k[0].shape[1], k[0].shape[2]
    qg = (q * scale).reshape(B, Hkv, (Hq // Hkv) * L, D)  # a KV head's query heads share its keys (GQA)
    blocks = range(0, N, DEQUANT_BLOCK)

    def block(x: tuple, a: int) -> mx.array:
        return mx.dequantize(*(t[..., a : a + DEQUANT_BLOCK, :] for t in x), group_size=group_size, bits=bits)

    parts = []
    for a in blocks:  # each block evaluated before the next is dequantized: one float block at a time
        parts.append(qg @ block(k, a).swapaxes(-1, -2))
        mx.eval(parts[-1])
    s = _causal_rows(mx.concatenate(parts, axis=-1), L)
    p = mx.softmax(s, axis=-1, precise=True)
    out = None
    for a in blocks:
        o = p[..., a : a + DEQUANT_BLOCK] @ block(v, a)
        out = o if out is None else out + o
        mx.eval(out)
    return out.reshape(B, Hq, L, D)


def _causal_rows(s: mx.array, L: int) -> mx.array:
    """Scores (.., G*L, N) of the last L positions, row g*L + i being query i: it sees keys up to N - L + i."""
    if L == 1:
        return s
    N = s.shape[-1]
    rows = N - L + mx.arange(s.shape[-2]) % L
    return mx.where(mx.arange(N)[None] <= rows[:, None], s, mx.array(-mx.inf, s.dtype))


def few_query_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool) -> mx.array:
    """A few new queries (decode, a speculative check) over float keys by two matmuls and one softmax.

    On the CPU MLX's attention kernel is slower than this for few queries, the more so the longer the
    cache (`python -m qwen2_mlx.bench.decode_attention`); the scores are only (heads x L x keys)."""
    B, Hq, L, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    qg = (q * scale).reshape(B, Hkv, Hq // Hkv, L, D)  # a KV head's query heads share its keys (GQA)
    # Keys broadcast over a group axis (as MLX's own fallback does) rather than the groups folded into
    # rows: the same speed, and the decode step that grows the cache peaked higher the other way (bench.kv).
    s = qg @ mx.expand_dims(k, 2).swapaxes(-1, -2)
    if causal and L > 1:
        s = mx.where(_causal_tail(L, N), s, mx.array(-mx.inf, s.dtype))
    p = mx.softmax(s, axis=-1, precise=True)
    return (p @ mx.expand_dims(v, 2)).reshape(B, Hq, L, D)


def tiled_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Optional[Any]) -> mx.array:
    """MLX's attention on the CPU in query tiles of at most `PLAIN_TILE_SCORES` scores, each evaluated before
    the next. The CPU kernel holds all (heads x queries x keys) scores at once, so a prefill step's peak grew
    with the context; tiled it is bounded, at the same speed (the softmax's exp dominates either way).
    A tile's keys stop at its last query (causal masks are bottom-right aligned). Metal and CUDA fuse it.
    A few float32 queries go through `few_query_attention` instead."""
    B, Hq, L, _ = q.shape
    N = k.shape[2]
    if L <= DEQUANT_QUERIES and q.dtype == k.dtype == mx.float32 and (mask is None or isinstance(mask, str)):
        return few_query_attention(q, k, v, scale, causal=mask is not None)
    T = max(1, PLAIN_TILE_SCORES // (B * Hq * N))
    if L <= T or (mask is not None and not (isinstance(mask, str) and mask == "causal")):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)  # array masks: one call
    parts = []
    for a in range(0, L, T):
        b = min(L, a + T)
        n = N if mask is None else N - L + b
        kk, vv = k[..., :n, :], v[..., :n, :]
        parts.append(mx.fast.scaled_dot_product_attention(q[..., a:b, :], kk, vv, scale=scale, mask=mask))
        mx.eval(parts[-1])
    return mx.concatenate(parts, axis=2)


def plain_cache_fits(geom: DCAGeometry, cache: Optional[Any], L: int) -> bool:
    """Whether a DCA layer may run plain attention over a plain cache (mlx-lm's `KVCache`, `BatchKVCache`).

    Exact while the sequence has at most `chunk_size + 1` tokens and no DCA temperature applies there;
    batches use this (a batch cache's `_idx` counts its padding, so it can only err towards refusing).
    """
    if cache is None or isinstance(cache, (DCAKVCache, QuantizedDCAKVCache)) or not geom.plain_exact:
        return False
    held = cache._idx if isinstance(cache, BatchKVCache) else cache.offset  # offset is per row there
    return held + L <= geom.plain_limit


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        dca = args.dual_chunk_attention_config
        self.dca = DCAGeometry.from_config(dca) if dca is not None else None
        # Under DCA the frequencies are always the plain ones (docs/long-context.md §1; Model warns once).
        scaling = None if dca is not None else args.rope_scaling
        self.rope = RoPE(head_dim, args.rope_theta, args.rope_traditional, scaling, args.max_position_embeddings)
        self.scale = head_dim**-0.5 * self.rope.attention_scale
        self._qkv = StackedProjections(("q_proj", "k_proj", "v_proj"))

    def stack_projections(self) -> None:
        self._qkv.refresh(self)

    def __call__(self, x: mx.array, mask: Optional[Any] = None, cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv_heads
        # (B, heads, L, head_dim) with q's heads, then k's, then v's.
        qkv = self._qkv(self, x).reshape(B, L, nh + 2 * nkv, -1).transpose(0, 2, 1, 3)

        if self.dca is not None and not plain_cache_fits(self.dca, cache, L):  # q, k rotated differently there
            out = self._dual_chunk(qkv[:, :nh], qkv[:, nh : nh + nkv], qkv[:, nh + nkv :], mask, cache)
        else:
            offset = cache.offset if cache is not None else 0
            qk = self.rope(qkv[:, : nh + nkv], offset=offset)
            q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :]
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
            out = self._attend(q, k, v, cache, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    @staticmethod
    def _attend(q: mx.array, k, v, cache: Optional[Any], scale: float, mask: Optional[Any]) -> mx.array:
        """The fused attention over the cache's keys and values; on the CPU a quantized cache is read in
        float (see kv_cache.QUANTIZED_READS_ON_CPU), a block of keys at a time for a few new tokens."""
        if hasattr(cache, "bits") and reads_dequantized():
            if q.shape[2] <= DEQUANT_QUERIES and not isinstance(mask, mx.array):
                return dequantized_attention(q, k, v, scale, cache.group_size, cache.bits)
            k, v = (mx.dequantize(*x, group_size=cache.group_size, bits=cache.bits) for x in (k, v))
            cache = None  # the fused kernel on floats
        if not hasattr(cache, "bits") and mx.default_device() == mx.cpu:
            return tiled_attention(q, k, v, scale, mask)
        return scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)

    def _dual_chunk(self, q: mx.array, k: mx.array, v: mx.array, mask: Optional[Any], cache: Optional[Any]):
        geom = self.dca
        if cache is not None and not isinstance(cache, (DCAKVCache, QuantizedDCAKVCache)):
            raise TypeError(
                f"Dual Chunk Attention past {geom.plain_limit} tokens needs DCAKVCache layers (from "
                f"model.make_cache(), or their quantized form), got {type(cache).__name__}"
            )
        if (
            cache is not None
            and cache.chunk_size
            and cache.dca_settings != (geom.chunk_size, geom.local_size, geom.original_max_position_embeddings)
        ):
            raise ValueError(
                f"this KV cache was built for DCA settings {cache.dca_settings}, the model uses "
                f"{(geom.chunk_size, geom.local_size, geom.original_max_position_embeddings)}"
            )
        L = q.shape[2]
        offset = cache.offset if cache is not None else 0
        total = offset + L
        # vLLM's temperature: keys keep the factor of their write time, queries use the current one.
        hint = getattr(cache, "length_hint", 0)
        temp = dca_temperature(max(total, hint), geom.original_max_position_embeddings)
        k = rotate_keys(self.rope, k, offset, geom)
        scale = self.scale * temp
        if L > 1 and 0 < hint <= offset and temp != 1.0:
            # Several tokens past the prompt (a speculative verify step): each gets the factor it would
            # have had decoded alone, on its key and (folded into q) its query (docs/long-context.md §5).
            orig = geom.original_max_position_embeddings
            temps = mx.array([dca_temperature(offset + i + 1, orig) for i in range(L)], dtype=k.dtype)[:, None]
            k, q, scale = k * temps, q * temps, self.scale
        elif temp != 1.0:
            k = k * temp
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        quantized = hasattr(cache, "bits")  # keys were quantized after rotation and scaling
        if total <= geom.period or (L > 1 and total <= geom.plain_limit):
            # DCA equals plain attention here; decode past c is cheaper on the DCA path than re-rotating.
            q = self.rope(q, offset=offset)
            if quantized and total <= geom.period:  # no re-rotation: read as stored
                return self._attend(q, k, v, cache, scale, mask)
            if quantized:  # one prefill reaching past c: its keys are re-rotated once, in float
                k, v = (mx.dequantize(*x, group_size=cache.group_size, bits=cache.bits) for x in (k, v))
            return self._attend(q, plain_keys(self.rope, k, geom), v, None, scale, mask)
        if isinstance(mask, mx.array):
            raise ValueError("Dual Chunk Attention builds its own causal masks; padded batches are not supported")
        if quantized:
            k, v = (QuantizedKV(*x, cache.group_size, cache.bits) for x in (k, v))
        return dca_attention(q, k, v, offset, self.rope, scale, geom)
