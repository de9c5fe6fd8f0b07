"""The CPU prefill's attention in query tiles: the same output as one fused call, a peak bounded by the tile
budget instead of growing with the context, and the same logits through a whole model."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from api_support import tiny_model

from qwen2_mlx import load
from qwen2_mlx.models import attention


def _qkv(L: int, N: int, Hq: int = 14, Hkv: int = 2, D: int = 64, seed: int = 0):
    mx.random.seed(seed)
    q = mx.random.normal((1, Hq, L, D))
    k, v = mx.random.normal((1, Hkv, N, D)), mx.random.normal((1, Hkv, N, D))
    mx.eval(q, k, v)
    return q, k, v


@pytest.mark.parametrize("mask", ["causal", None])
@pytest.mark.parametrize("L,N", [(300, 300), (300, 1000), (7, 500)])
def test_tiles_equal_one_call(monkeypatch, mask, L, N):
    q, k, v = _qkv(L, N)
    whole = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    monkeypatch.setattr(attention, "PLAIN_TILE_SCORES", 14 * N * 64)  # 64-query tiles, the last one short
    tiled = attention.tiled_attention(q, k, v, 0.125, mask)
    assert tiled.shape == whole.shape
    np.testing.assert_allclose(np.array(tiled), np.array(whole), atol=2e-6, rtol=1e-5)


def test_array_masks_are_one_call(monkeypatch):
    """A batch's array mask is not sliced by tiles: it goes to the fused call whole."""
    q, k, v = _qkv(64, 64, Hq=2)
    mask = mx.tril(mx.ones((64, 64), dtype=mx.bool_))
    monkeypatch.setattr(attention, "PLAIN_TILE_SCORES", 2 * 64 * 8)
    calls = []
    real = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    attention.tiled_attention(q, k, v, 0.125, mask)
    assert len(calls) == 1


def test_peak_is_bounded_by_the_tile(monkeypatch):
    """The step's scores (heads x queries x keys) are never held at once."""
    L, N = 512, 8192
    q, k, v = _qkv(L, N)
    full_scores = 14 * L * N * 4
    monkeypatch.setattr(attention, "PLAIN_TILE_SCORES", 1 << 20)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(attention.tiled_attention(q, k, v, 0.125, "causal"))
    assert mx.get_peak_memory() - base < full_scores / 8


def test_model_logits_unchanged(monkeypatch, tmp_path_factory):
    """A tiny model prefilled in steps over a growing cache: tiny tiles give the one-call logits."""
    _, _, path = tiny_model(tmp_path_factory)
    model, _ = load(path, long_context="off")
    ids = [(i * 37) % 200 + 3 for i in range(96)]

    def logits() -> np.ndarray:
        cache, out = model.make_cache(), []
        for a in range(0, len(ids), 40):
            out.append(model(mx.array(ids[a : a + 40])[None], cache=cache)[0])
        return np.array(mx.concatenate(out))

    whole = logits()
    monkeypatch.setattr(attention, "PLAIN_TILE_SCORES", 1)  # one query a tile
    np.testing.assert_allclose(logits(), whole, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("L,N,B", [(1, 700, 1), (1, 300, 3), (5, 400, 2), (16, 16, 1)])
def test_few_queries_by_matmul_equal_the_fused_call(L, N, B):
    """Decode steps and speculative checks on the CPU: two matmuls and a softmax, the fused call's output
    (causal for several queries, GQA heads each reading their own KV head)."""
    q, k, v = _qkv(L, N)
    q, k, v = (mx.concatenate([x] * B) if B > 1 else x for x in (q, k, v))
    v = v + 10.0 * mx.arange(2).reshape(1, 2, 1, 1)  # KV heads far apart: the wrong head cannot pass
    mask = "causal" if L > 1 else None
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    got = attention.few_query_attention(q, k, v, 0.125, causal=L > 1)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, rtol=1e-5)
    routed = attention.tiled_attention(q, k, v, 0.125, mask)  # the CPU's route for a few queries
    np.testing.assert_allclose(np.array(routed), np.array(got), atol=0, rtol=0)
