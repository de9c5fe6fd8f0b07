"""Dual Chunk Attention (DCA), vLLM's formulation (docs/long-context.md §3-§6). All DCA math lives here.

With `M = chunk_size`, `w = local_size` and period `c = M - w`, key `j` sits at position `j mod c`
(rotated once, when it enters the cache) and query `i` looks at key `j` from
`i mod c` (same chunk), `min(i mod c + c, M)` (previous chunk) or `min(2c - 1, M)` (older chunks).
Attention is one causal softmax over all keys with those per-pair scores; it is computed per query
tile that never crosses a chunk edge, over contiguous key ranges, so extra memory is
O(tile x keys) and never L x L. Sequences of at most `M + 1` tokens are exactly plain attention.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import mlx.core as mx
import numpy as np

from .kv_cache import reads_dequantized

# Score elements (query heads x tile rows x keys) one tile may hold at once; about 32 MB in fp32.
SCORE_BUDGET = 1 << 23
TILE_Q = 256
GPU_SCORE_SHARE = 256  # on a GPU, a tile's fp32 scores may take 1/256 of its memory


@functools.cache
def _gpu_memory() -> int:
    info = mx.device_info()
    return int(info.get("memory_size") or info.get("total_memory") or 0)  # Metal's name, CUDA's


def device_score_budget() -> int:
    """The tile budget for this device. On a GPU every key block is several kernel launches and, past the
    budget, a sync; at 32 MB a 64K prefill runs thousands of them per layer, so a GPU gets a share of its memory."""
    if mx.default_device() != mx.gpu:
        return SCORE_BUDGET
    return max(SCORE_BUDGET, _gpu_memory() // (4 * GPU_SCORE_SHARE))


@dataclass(frozen=True)
class DCAGeometry:
    """The numbers DCA works with: `M`, `w`, `c = M - w` and the temperature length `L0`."""

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int = 0

    @property
    def period(self) -> int:
        return self.chunk_size - self.local_size

    @property
    def inter_position(self) -> int:
        return min(2 * self.period - 1, self.chunk_size)

    def succ_position(self, r: int) -> int:
        return min(r + self.period, self.chunk_size)

    @property
    def plain_limit(self) -> int:
        """Longest sequence for which DCA equals plain causal RoPE attention (docs/long-context.md §3)."""
        return self.chunk_size + 1

    @property
    def plain_exact(self) -> bool:
        """Whether plain attention equals DCA at every length up to `plain_limit` (no temperature there)."""
        L0 = self.original_max_position_embeddings
        return L0 <= 0 or L0 >= self.plain_limit

    @classmethod
    def from_config(cls, cfg) -> DCAGeometry:
        return cls(cfg.chunk_size, cfg.local_size, cfg.original_max_position_embeddings)


def dca_temperature(length: int, original_max_position_embeddings: int) -> float:
    """vLLM's logit temperature `s(L) = max(1, 0.1 ln(L / L0) + 1)`, 1 when `L0 == 0` (docs/long-context.md §5)."""
    if original_max_position_embeddings <= 0 or length <= original_max_position_embeddings:
        return 1.0
    return max(1.0, 0.1 * math.log(length / original_max_position_embeddings) + 1.0)


def dca_pair_positions(i, j, chunk_size: int, local_size: int):
    """Per-pair (query position, key position) (docs/long-context.md §3) for positions `j <= i` (numpy, int64)."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    c, m = chunk_size - local_size, chunk_size
    gap = i // c - j // c
    pq = np.where(gap == 0, i % c, np.where(gap == 1, np.minimum(i % c + c, m), min(2 * c - 1, m)))
    return pq, j % c


def effective_rope_scaling(args) -> Optional[dict]:
    """The `rope_scaling` the model really uses: none under DCA (docs/long-context.md §1), which says so once."""
    if getattr(args, "dual_chunk_attention_config", None) is not None and args.rope_scaling:
        warnings.warn(
            "both rope_scaling and dual_chunk_attention_config are set: Dual Chunk Attention uses plain "
            "RoPE frequencies, so rope_scaling is ignored (its temperature comes from "
            "dual_chunk_attention_config.original_max_position_embeddings)",
            UserWarning,
            stacklevel=3,
        )
        return None
    return args.rope_scaling


def long_context_signature(args) -> dict:
    """What a KV cache's contents depend on besides the weights; saved prompt caches must match it."""
    dca = getattr(args, "dual_chunk_attention_config", None)
    scaling = None if dca is not None else args.rope_scaling
    return {
        "rope_theta": float(args.rope_theta),
        "rope_traditional": bool(getattr(args, "rope_traditional", False)),
        "rope_scaling": dict(scaling) if scaling else None,
        "dual_chunk_attention_config": dca.to_dict() if dca is not None else None,
    }


# --------------------------------------------------------------------------------------------
# Rotations


def rope_constant(rope, x: mx.array, position: int) -> mx.array:
    """Rotate every row of `x` (..., T, D) at the same position: T becomes a batch axis."""
    return rope(x[..., None, :], offset=position).squeeze(-2)


def rotate_keys(rope, k: mx.array, offset: int, geom: DCAGeometry) -> mx.array:
    """Rotate keys at absolute positions `offset + t` to `(offset + t) mod c`, one rope call per chunk."""
    c, T = geom.period, k.shape[-2]
    parts, t = [], 0
    while t < T:
        r = (offset + t) % c
        n = min(T - t, c - r)
        parts.append(rope(k[..., t : t + n, :], offset=r))
        t += n
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-2)


def plain_keys(rope, keys: mx.array, geom: DCAGeometry) -> mx.array:
    """Cached DCA keys as plain RoPE keys, valid while the sequence has at most `M + 1` tokens.

    Keys of chunk 1 sit at `j - c`; one more rotation by `c` puts them at `j` (R(c)R(j-c) = R(j)).
    """
    c = geom.period
    if keys.shape[-2] <= c:
        return keys
    return mx.concatenate([keys[..., :c, :], rope_constant(rope, keys[..., c:, :], c)], axis=-2)


def stored_keys(rope, keys: mx.array, geom: DCAGeometry) -> mx.array:
    """Plain RoPE keys (at most `M + 1` of them) as a DCA cache stores them: the inverse of `plain_keys`.

    Keys past `c` go back by `c`: R(-c) x = F R(c) F x, where F negates the second element of every
    rotated pair (a rotation's inverse is its mirror image), so `mx.fast.rope` does it at offset `c`.
    """
    c = geom.period
    if keys.shape[-2] <= c:
        return keys
    D, d = keys.shape[-1], rope.dims
    pair_second = np.arange(D) % 2 == 1 if rope.traditional else (np.arange(D) >= d // 2)
    flip = mx.array(np.where(pair_second & (np.arange(D) < d), -1.0, 1.0), dtype=keys.dtype)
    return mx.concatenate([keys[..., :c, :], rope_constant(rope, keys[..., c:, :] * flip, c) * flip], axis=-2)


def query_copies(rope, q: mx.array, start: int, geom: DCAGeometry):
    """The intra / succ / inter rotations of queries at `start + t`, all in one chunk (succ/inter None if unused)."""
    c, T = geom.period, q.shape[-2]
    n, r0 = divmod(start, c)
    qi = rope(q, offset=r0)
    qs = qn = None
    if n >= 1:
        exact = min(max(geom.local_size - r0 + 1, 0), T)  # rows with r <= w keep r + c unclamped
        parts = []
        if exact:
            parts.append(rope(q[..., :exact, :], offset=r0 + c))
        if exact < T:
            parts.append(rope_constant(rope, q[..., exact:, :], geom.chunk_size))
        qs = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-2)
    if n >= 2:
        qn = rope_constant(rope, q, geom.inter_position)
    return qi, qs, qn


# --------------------------------------------------------------------------------------------
# Attention


class QuantizedKV(NamedTuple):
    """Keys or values as a quantized KV cache holds them: mlx's (data, scales, biases) and the format.

    DCA reads them as stored, through quantized matmuls, never dequantizing the cache as a whole."""

    data: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple:
        return (*self.data.shape[:-1], self.data.shape[-1] * 32 // self.bits)

    def rows(self, a: int, b: int) -> QuantizedKV:
        data, scales, biases = (t[..., a:b, :] for t in (self.data, self.scales, self.biases))
        return self._replace(data=data, scales=scales, biases=biases)

    def dequantized(self) -> mx.array:
        return mx.dequantize(self.data, self.scales, self.biases, group_size=self.group_size, bits=self.bits)

    def matmul(self, x: mx.array, transpose: bool) -> mx.array:
        x = x.astype(self.scales.dtype)
        if reads_dequantized():
            w = self.dequantized()
            return x @ (w.swapaxes(-1, -2) if transpose else w)
        return mx.quantized_matmul(
            x, self.data, self.scales, self.biases, transpose=transpose, group_size=self.group_size, bits=self.bits
        )


KV = Union[mx.array, QuantizedKV]


def _rows(x: KV, a: int, b: int) -> KV:
    return x.rows(a, b) if isinstance(x, QuantizedKV) else x[..., a:b, :]


def _scores(q: mx.array, k: KV) -> mx.array:
    """q (B, Hkv, G*T, D) @ k (B, Hkv, K, D)^T in the input dtype, returned in float32."""
    if isinstance(k, QuantizedKV):
        return k.matmul(q, transpose=True).astype(mx.float32)
    return (q @ k.swapaxes(-1, -2)).astype(mx.float32)


def _pv(p: mx.array, v: KV) -> mx.array:
    """Probabilities (fp32) times values, the result in float32."""
    if isinstance(v, QuantizedKV):
        return v.matmul(p, transpose=False).astype(mx.float32)
    if v.dtype == mx.float32:
        return p @ v
    return (p.astype(v.dtype) @ v).astype(mx.float32)


def _causal_tail(T: int, K: int) -> mx.array:
    """Lower-right aligned causal mask of T queries over K keys (the last T keys are the queries')."""
    return mx.arange(K)[None, :] <= (K - T) + mx.arange(T)[:, None]


def _mask_tail(s: mx.array, groups: int, T: int) -> mx.array:
    """Mask scores (B, Hkv, G*T, K) causally against their own last T keys."""
    B, H, _, K = s.shape
    s = s.reshape(B, H, groups, T, K)
    s = mx.where(_causal_tail(T, K), s, -mx.inf)
    return s.reshape(B, H, groups * T, K)


def _tile_ranges(start: int, e: int, geom: DCAGeometry):
    """Key ranges of a tile of chunk n ending at e: (which query copy, key start, key end, causal)."""
    c = geom.period
    n = start // c
    ranges = []
    if n >= 2:
        ranges.append(("inter", 0, (n - 1) * c, False))
    if n >= 1:
        ranges.append(("succ", (n - 1) * c, n * c, False))
    ranges.append(("intra", n * c, e, True))
    return ranges


def _attend_concat(copies, keys, values, start, e, groups, T, geom):
    """One softmax over the concatenated scores of all parts (needs Hq*T*e score elements)."""
    parts = []
    for name, k0, k1, causal in _tile_ranges(start, e, geom):
        s = _scores(copies[name], _rows(keys, k0, k1))
        parts.append(_mask_tail(s, groups, T) if causal and T > 1 else s)
    s = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    p = mx.softmax(s, axis=-1, precise=True)
    return _pv(p, _rows(values, 0, e))


def _attend_blocks(copies, keys, values, start, e, groups, T, geom, block, bounded=False):
    """Each part in key blocks of at most `block` keys, folded into a running (max, sum, weighted V)
    in float32: the log-sum-exp merge of the partial softmaxes, one block at a time (docs/long-context.md §4).
    With `bounded`, the running state is evaluated after each block, so only one block's scores exist."""
    m_run = l_run = acc = None
    for name, k0, k1, causal in _tile_ranges(start, e, geom):
        q = copies[name]
        # Blocks end at k1 so the causal block (the tile's own keys) is always the last one.
        b1 = k1
        while b1 > k0:
            b0 = max(k0, b1 - block)  # block >= T: the tile's own keys share one block
            s = _scores(q, _rows(keys, b0, b1))
            if causal and b1 == k1 and T > 1:
                s = _mask_tail(s, groups, T)
            m = mx.max(s, axis=-1, keepdims=True)
            if m_run is not None:
                m = mx.maximum(m, m_run)
            p = mx.exp(s - m)
            norm = mx.sum(p, axis=-1, keepdims=True)
            o = _pv(p, _rows(values, b0, b1))
            if m_run is not None:
                a = mx.exp(m_run - m)  # rescale what came before to the new running max
                norm = norm + a * l_run
                o = o + a * acc
            m_run, l_run, acc = m, norm, o
            if bounded:
                mx.eval(m_run, l_run, acc)
            b1 = b0
    return acc / l_run


def _decode_step(q, keys, values, offset, rope, geom, groups):
    """One new token (batch 1) over a quantized cache, read as stored, or a float one on the CPU: the query's
    rotations in one rope call (positions as a batch of offsets), one matmul against all keys, each
    key range takes its scores from the matching rotation; one softmax over them all (docs/long-context.md §4)."""
    _, Hq, _, D = q.shape
    Hkv = keys.shape[1]
    c = geom.period
    n, r = divmod(offset, c)
    positions = [geom.inter_position, geom.succ_position(r), r][max(0, 2 - n) :]  # key order: inter, succ, intra
    k = len(positions)
    if k == 1:
        qs = rope(q, offset=r)
    else:
        # Copied, not a broadcast view: MLX's CUDA rope (0.32) gives its output the input's strides, so
        # a stride-0 batch made every copy overwrite the others (the lost needles past chunk 1 on GPUs).
        qs = rope(mx.contiguous(mx.broadcast_to(q, (k, Hq, 1, D))), offset=mx.array(positions))
    # (k, Hq, 1, D) -> (1, Hkv, k*G, D): rows [copy0 heads of this KV head, copy1 ..., ...]
    qs = qs.reshape(k, Hkv, groups, D).transpose(1, 0, 2, 3).reshape(1, Hkv, k * groups, D)
    s = _scores(qs, keys)  # (1, Hkv, k*G, p+1)
    edges = [0, (n - 1) * c, n * c, offset + 1][3 - k :]
    edges[0] = 0
    parts = [s[:, :, i * groups : (i + 1) * groups, edges[i] : edges[i + 1]] for i in range(k)]
    s = parts[0] if k == 1 else mx.concatenate(parts, axis=-1)
    p = mx.softmax(s, axis=-1, precise=True)
    o = _pv(p, values)  # (1, Hkv, G, D)
    return o.reshape(1, Hq, 1, -1).astype(q.dtype)


def _decode_fused(q, keys, values, offset, rope, geom):
    """One new token (batch 1) over a float cache through `mx.fast.scaled_dot_product_attention`:
    on a GPU a handful of launches per layer is what decoding costs, so few and fused ones matter.

    The query is rotated once, at its in-chunk position r; the older key ranges are turned instead by
    the difference to the position their query copy would have (q_P . k_b = q_r . k_(b + r - P)), so one
    softmax over one key array gives the same scores as the three query copies. Float32 throughout, as
    the matmul path: the real model's attention-sink scores need it."""
    c = geom.period
    n, r = divmod(offset, c)
    ranges = [(0, (n - 1) * c, r - geom.inter_position)] if n >= 2 else []
    ranges += [((n - 1) * c, n * c, r - geom.succ_position(r))] if n >= 1 else []
    # Copies before rope: MLX's CUDA rope (0.32) keeps an input view's strides in its output.
    parts = [rope_constant(rope, mx.contiguous(keys[..., a:b, :]), turn) for a, b, turn in ranges]
    keys = mx.concatenate([*parts, keys[..., n * c : offset + 1, :]], axis=-2)
    q = rope(q, offset=r)
    return mx.fast.scaled_dot_product_attention(q, keys, values.astype(q.dtype), scale=1.0)


def dca_attention(
    q: mx.array,
    keys: KV,
    values: KV,
    offset: int,
    rope,
    scale: float,
    geom: DCAGeometry,
    tile_q: int = TILE_Q,
    score_budget: Optional[int] = None,
) -> mx.array:
    """DCA for queries at `offset .. offset+T-1` over cached keys `0 .. offset+T-1`.

    `q` (B, Hq, T, D) is un-rotated; `keys` are rotated at `j mod c` (and carry the key temperature);
    `values` are raw; either may be a `QuantizedKV` (a quantized cache). `scale` multiplies q·k
    (1/sqrt(D) times the query temperature). Returns (B, Hq, T, D) in q's dtype. Query head h reads KV head h // G.
    """
    B, Hq, T, D = q.shape
    Hkv = keys.shape[1]
    groups = Hq // Hkv
    c = geom.period
    dtype = q.dtype
    if not isinstance(keys, QuantizedKV) and keys.dtype != mx.float32:
        # Half-precision score matmuls round Qwen's attention-sink logits (several hundred) to whole
        # units; the fused SDPA keeps scores in float32, so DCA does too (tests/test_dca_real_chunk.py).
        keys, q = keys.astype(mx.float32), q.astype(mx.float32)
    q = q * scale
    if T == 1 and B == 1:  # its scores are linear in the length, like the KV cache itself
        # On the CPU the matmul step is the fast one for float caches too (bench.decode_attention).
        if isinstance(keys, QuantizedKV) or mx.default_device() == mx.cpu:
            return _decode_step(q, keys, values, offset, rope, geom, groups).astype(dtype)
        return _decode_fused(q, keys, values, offset, rope, geom).astype(dtype)
    # A lazy graph of many tiles may keep all their score buffers alive at once (a GPU frees them when
    # the command buffer completes), which would bring back the L x L term; past the budget, evaluate
    # tile by tile. A single query never needs it (and a sync would stall decoding).
    score_budget = device_score_budget() if score_budget is None else score_budget
    bounded = T > 1 and Hq * T * (offset + T) > 2 * score_budget
    out = []
    b = offset
    while b < offset + T:
        e = min(offset + T, (b // c + 1) * c, b + tile_q)  # a tile never crosses a chunk edge
        tq = e - b
        copies = query_copies(rope, q[..., b - offset : e - offset, :], b, geom)
        # (B, Hq, tq, D) -> (B, Hkv, G*tq, D): the G query heads of a KV head become rows.
        copies = {
            name: x.reshape(B, Hkv, groups * tq, D)
            for name, x in zip(("intra", "succ", "inter"), copies)
            if x is not None
        }
        if Hq * tq * e <= score_budget:
            o = _attend_concat(copies, keys, values, b, e, groups, tq, geom)
        else:
            block = max(score_budget // (Hq * tq), tq)
            o = _attend_blocks(copies, keys, values, b, e, groups, tq, geom, block, bounded)
        if bounded:
            mx.eval(o)  # frees this tile's scores before the next tile allocates its own
        out.append(o.reshape(B, Hq, tq, -1))
        b = e
    o = out[0] if len(out) == 1 else mx.concatenate(out, axis=-2)
    return o.astype(dtype)
