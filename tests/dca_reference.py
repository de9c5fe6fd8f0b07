"""An independent float64 numpy reference for Dual Chunk Attention, straight from docs/long-context.md §3.

Per-pair positions, one full causal softmax, no tiles, no caches: deliberately nothing like the
production code in qwen2_mlx/models/dca.py, so that the two check each other.
"""

from __future__ import annotations

import numpy as np


def pair_positions(i: int, j: int, chunk_size: int, local_size: int) -> tuple[int, int]:
    """(query position, key position) of one visible pair, written out case by case."""
    c = chunk_size - local_size
    key = j % c
    gap = i // c - j // c
    if gap == 0:
        return i % c, key
    if gap == 1:
        return min(i % c + c, chunk_size), key
    return min(2 * c - 1, chunk_size), key


def rotate(x: np.ndarray, pos, inv_freq: np.ndarray, fp32_angles: bool = False) -> np.ndarray:
    """Rotate-half RoPE of rows x (..., D) at positions `pos` (broadcast against x's leading axes)."""
    half = x.shape[-1] // 2
    pos = np.asarray(pos, dtype=np.float64)
    if fp32_angles:  # what every real implementation does (docs/long-context.md §9)
        ang = (pos[..., None].astype(np.float32) * inv_freq.astype(np.float32)).astype(np.float64)
    else:
        ang = pos[..., None] * inv_freq
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    inv_freq: np.ndarray,
    chunk_size: int | None = None,
    local_size: int | None = None,
    tau=1.0,
    first_query: int = 0,
) -> np.ndarray:
    """Causal attention of q (Hq, T, D) at positions first_query.. over k, v (Hkv, L, D) at 0..L-1.

    With chunk_size/local_size: DCA positions per pair; without: plain RoPE positions i, j.
    `tau` is a scalar or a (T, L) matrix of logit multipliers (the DCA temperature).
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    Hq, T, D = q.shape
    Hkv, L, _ = k.shape
    G = Hq // Hkv
    tau = np.broadcast_to(np.asarray(tau, dtype=np.float64), (T, L))
    out = np.zeros((Hq, T, v.shape[-1]))
    for t in range(T):
        i = first_query + t
        js = np.arange(i + 1)
        if chunk_size is None:
            pq, pk = np.full(i + 1, i), js
        else:
            pq, pk = np.array([pair_positions(i, j, chunk_size, local_size) for j in js]).T
        for h in range(Hq):
            kv = h // G
            qr = rotate(np.broadcast_to(q[h, t], (i + 1, D)), pq, inv_freq)
            kr = rotate(k[kv, : i + 1], pk, inv_freq)
            s = np.sum(qr * kr, axis=-1) * tau[t, : i + 1] / np.sqrt(D)
            p = np.exp(s - s.max())
            out[h, t] = (p / p.sum()) @ v[kv, : i + 1]
    return out
