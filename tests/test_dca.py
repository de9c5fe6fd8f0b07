"""Dual Chunk Attention against an independent float64 reference (docs/long-context.md §10)."""

from __future__ import annotations

import math
import warnings

import dca_reference as ref
import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx.models.attention import Attention
from qwen2_mlx.models.config import ConfigError, DCAConfig, ModelArgs, parse_dca
from qwen2_mlx.models.dca import (
    DCAGeometry,
    _decode_fused,
    _decode_step,
    dca_attention,
    dca_pair_positions,
    dca_temperature,
    long_context_signature,
    query_copies,
    rope_constant,
    rotate_keys,
)
from qwen2_mlx.models.kv_cache import DCAKVCache
from qwen2_mlx.models.model import Model
from qwen2_mlx.models.rope import RoPE

GEOMS = [(12, 4), (9, 3)]  # (M, w): c = 8 and c = 6 (the paper's Figure 2)
ONE_M = (262144, 8192)


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# 1-2. Position tables


@pytest.mark.parametrize("M,w", GEOMS + [ONE_M])
def test_position_golden_values(M, w):
    c = M - w
    cases = {
        (c - 1, 0): (c - 1, 0),  # intra, last of chunk 0
        (c, c - 1): (c, c - 1),  # first succ, exact
        (c + w, 0): (c + w, 0),  # last exact succ (= M)
        (c + w + 1, 0): (M, 0),  # first clamped succ
        (2 * c - 1, c): (c - 1, 0),  # intra of chunk 1
        (2 * c, c): (c, 0),  # succ at true distance c
        (2 * c, c - 1): (min(2 * c - 1, M), c - 1),  # first inter
    }
    for (i, j), want in cases.items():
        got = tuple(int(x) for x in dca_pair_positions(i, j, M, w))
        assert got == want, (i, j)
        assert ref.pair_positions(i, j, M, w) == want
    if M == ONE_M[0]:
        assert c == 253952 and min(2 * c - 1, M) == 262144


@pytest.mark.parametrize("M,w", GEOMS)
def test_position_properties(M, w):
    c = M - w
    i, j = np.tril_indices(6 * c)
    pq, pk = dca_pair_positions(i, j, M, w)
    assert np.all(pq - pk >= 0) and np.all(pq - pk <= M)
    assert np.all(pk < c) and np.all(pq <= M)
    # intra distances are exact; everything within M + 1 tokens is exact
    same = i // c == j // c
    assert np.all((pq - pk)[same] == (i - j)[same])
    near = i <= M
    assert np.all((pq - pk)[near] == (i - j)[near])


def test_paper_figure_2():
    M, w = 9, 3  # chunk 6, pre-training window 10, local window 4 in the paper's words
    succ = [int(dca_pair_positions(i, 0, M, w)[0]) for i in range(6, 12)]
    assert succ == [6, 7, 8, 9, 9, 9]
    rows = {
        9: [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
        10: [9, 8, 7, 6, 5, 4, 4, 3, 2, 1, 0],
        11: [9, 8, 7, 6, 5, 4, 5, 4, 3, 2, 1, 0],
    }
    for i, want in rows.items():
        pq, pk = dca_pair_positions(i, np.arange(i + 1), M, w)
        assert (pq - pk).tolist() == want
    assert int(dca_pair_positions(12, 0, M, w)[0]) == 9  # inter


# ---------------------------------------------------------------------------------------------
# Helpers: the production attention on raw q, k, v


def mlx_dca(q, k, v, M, w, rope, scale=None, **kw):
    """Rotate keys at j mod c, then dca_attention from offset 0 (what a fresh prefill does)."""
    geom = DCAGeometry(M, w)
    qm, km, vm = (mx.array(a.astype(np.float32))[None] for a in (q, k, v))
    keys = rotate_keys(rope, km, 0, geom)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return np.array(dca_attention(qm, keys, vm, 0, rope, scale, geom, **kw)[0])


def mlx_plain(q, k, v, rope, scale=None):
    qm, km, vm = (mx.array(a.astype(np.float32))[None] for a in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return np.array(mx.fast.scaled_dot_product_attention(rope(qm), rope(km), vm, scale=scale, mask="causal")[0])


def qkv(L, Hq=4, Hkv=2, D=8, seed=0, scale=1.0):
    r = rng(seed)
    return (r.standard_normal((Hq, L, D)) * scale, r.standard_normal((Hkv, L, D)), r.standard_normal((Hkv, L, D)))


# ---------------------------------------------------------------------------------------------
# 3-6. Equivalence, divergence, multi-chunk prefill, GQA


@pytest.mark.parametrize("M,w", GEOMS)
@pytest.mark.parametrize("kind", ["plain", "yarn", "tau"])
def test_equivalence_up_to_m_plus_1(M, w, kind):
    c, D = M - w, 8
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16} if kind == "yarn" else None
    rope = RoPE(D, 10000.0, scaling=scaling, max_position_embeddings=64)
    tau = 1.7 if kind == "tau" else 1.0
    for L in sorted({1, 2, c - 1, c, c + 1, M, M + 1}):
        q, k, v = qkv(L, seed=L)
        a = ref.attention(q, k, v, rope.inv_freq, M, w, tau=tau)
        b = ref.attention(q, k, v, rope.inv_freq, tau=tau)
        np.testing.assert_allclose(a, b, atol=1e-12, err_msg=f"L={L}")
        scale = D**-0.5 * tau
        got = mlx_dca(q, k, v, M, w, rope, scale)
        np.testing.assert_allclose(got, mlx_plain(q, k, v, rope, scale), atol=1e-5, err_msg=f"L={L}")
        np.testing.assert_allclose(got, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("M,w", GEOMS)
def test_first_divergence_at_m_plus_2(M, w):
    rope = RoPE(8, 10000.0)
    q, k, v = qkv(M + 2, seed=3)
    dca, plain = mlx_dca(q, k, v, M, w, rope), mlx_plain(q, k, v, rope)
    np.testing.assert_allclose(dca[:, : M + 1], plain[:, : M + 1], atol=1e-5)
    assert np.abs(dca[:, M + 1] - plain[:, M + 1]).max() > 1e-3


@pytest.mark.parametrize("M,w", GEOMS)
@pytest.mark.parametrize("D", [8, 64])
@pytest.mark.parametrize("tiling", [{}, {"tile_q": 3, "score_budget": 4 * 3 * 5}])
def test_multi_chunk_prefill(M, w, D, tiling):
    """L = 5c + 3: all three parts and a partial last chunk; one-softmax and key-blocked merges."""
    c = M - w
    L = 5 * c + 3
    rope = RoPE(D, 10000.0)
    q, k, v = qkv(L, D=D, seed=D)
    want = ref.attention(q, k, v, rope.inv_freq, M, w)
    np.testing.assert_allclose(mlx_dca(q, k, v, M, w, rope, **tiling), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (6, 1), (7, 1), (5, 1), (28, 4)])
def test_gqa(Hq, Hkv):
    M, w = 12, 4
    L = 3 * (M - w) + 2
    rope = RoPE(8, 10000.0)
    q, k, v = qkv(L, Hq, Hkv, seed=Hq * 10 + Hkv)
    # KV heads far apart, so reading head h % Hkv instead of h // G cannot pass
    v = v + 10.0 * np.arange(Hkv)[:, None, None]
    want = ref.attention(q, k, v, rope.inv_freq, M, w)
    np.testing.assert_allclose(mlx_dca(q, k, v, M, w, rope), want, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(
        mlx_dca(q, k, v, M, w, rope, tile_q=4, score_budget=Hq * 4 * 4), want, atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (7, 1)])
def test_decode_step_matches_tiled_path(Hq, Hkv):
    """The single-token fast path (one rope, one matmul) equals the general tiled path at every offset."""
    M, w = 12, 4
    geom = DCAGeometry(M, w)
    rope = RoPE(8, 10000.0)
    L = 4 * (M - w) + 2
    q, k, v = qkv(L, Hq, Hkv, seed=11)
    qm, km, vm = (mx.array(a.astype(np.float32))[None] for a in (q, k, v))
    keys = rotate_keys(rope, km, 0, geom)
    want = ref.attention(q, k, v, rope.inv_freq, M, w)
    two = [mx.concatenate([a, a]) for a in (qm, keys, vm)]  # batch 2 takes the general tiled path
    for t in range(L):
        args = (qm[:, :, t : t + 1], keys[:, :, : t + 1], vm[:, :, : t + 1], t, rope, 8**-0.5, geom)
        fast = np.array(dca_attention(*args)[0, :, 0])
        args2 = (two[0][:, :, t : t + 1], two[1][:, :, : t + 1], two[2][:, :, : t + 1], t, rope, 8**-0.5, geom)
        tiled = np.array(dca_attention(*args2, score_budget=Hq * 3)[1, :, 0])  # key blocks of 3
        np.testing.assert_allclose(fast, want[:, t], atol=1e-5, rtol=1e-4, err_msg=f"t={t}")
        np.testing.assert_allclose(tiled, fast, atol=1e-5, err_msg=f"t={t}")
        # Both single-token paths, whichever this device takes (the CPU the matmul step, a GPU the fused one)
        one = (qm[:, :, t : t + 1] * 8**-0.5, keys[:, :, : t + 1], vm[:, :, : t + 1], t, rope, geom)
        for out in (_decode_fused(*one), _decode_step(*one, Hq // Hkv)):
            np.testing.assert_allclose(np.array(out[0, :, 0]), want[:, t], atol=1e-5, rtol=1e-4, err_msg=f"t={t}")


# ---------------------------------------------------------------------------------------------
# The attention module with a DCA cache: decode, stepwise prefill, cache contents, temperature


def make_attention(M, w, L0=0, Hq=4, Hkv=2, D=8, seed=0):
    args = ModelArgs(
        model_type="qwen2",
        hidden_size=Hq * D,
        num_hidden_layers=1,
        intermediate_size=8,
        num_attention_heads=Hq,
        num_key_value_heads=Hkv,
        vocab_size=8,
        rope_theta=10000.0,
        dual_chunk_attention_config=DCAConfig(M, w, L0),
    )
    attn = Attention(args)
    r = rng(seed)
    H = Hq * D
    params = {
        "q_proj": (r.standard_normal((Hq * D, H)) / math.sqrt(H), r.standard_normal(Hq * D) * 0.5),
        "k_proj": (r.standard_normal((Hkv * D, H)) / math.sqrt(H), r.standard_normal(Hkv * D) * 0.5),
        "v_proj": (r.standard_normal((Hkv * D, H)) / math.sqrt(H), r.standard_normal(Hkv * D) * 0.5),
    }
    for name, (wt, b) in params.items():
        lin = getattr(attn, name)
        lin.weight, lin.bias = mx.array(wt.astype(np.float32)), mx.array(b.astype(np.float32))
    attn.o_proj.weight = mx.array((r.standard_normal((H, Hq * D)) / math.sqrt(H)).astype(np.float32))
    return attn


def layer_reference(attn, x: np.ndarray, M, w, tau=1.0) -> np.ndarray:
    """float64 output of the whole attention layer for x (L, H) at positions 0..L-1."""
    x = x.astype(np.float64)

    def proj(lin, heads):
        y = x @ np.array(lin.weight, dtype=np.float64).T
        if "bias" in lin:
            y = y + np.array(lin.bias, dtype=np.float64)
        return y.reshape(len(x), heads, -1).transpose(1, 0, 2)

    q, k, v = proj(attn.q_proj, attn.n_heads), proj(attn.k_proj, attn.n_kv_heads), proj(attn.v_proj, attn.n_kv_heads)
    o = ref.attention(q, k, v, attn.rope.inv_freq, M, w, tau=tau)
    return o.transpose(1, 0, 2).reshape(len(x), -1) @ np.array(attn.o_proj.weight, dtype=np.float64).T


def run_steps(attn, x: np.ndarray, steps, cache=None) -> np.ndarray:
    cache = (
        cache
        if cache is not None
        else DCAKVCache(attn.dca.chunk_size, attn.dca.local_size, attn.dca.original_max_position_embeddings)
    )
    outs, t = [], 0
    for n in steps:
        mask = "causal" if n > 1 else None
        outs.append(np.array(attn(mx.array(x[None, t : t + n].astype(np.float32)), mask, cache)[0]))
        t += n
    return np.concatenate(outs), cache


@pytest.mark.parametrize("M,w", GEOMS)
def test_module_one_shot_matches_reference(M, w):
    attn = make_attention(M, w)
    L = 5 * (M - w) + 3
    x = rng(1).standard_normal((L, attn.n_heads * attn.head_dim))
    got, cache = run_steps(attn, x, [L])
    np.testing.assert_allclose(got, layer_reference(attn, x, M, w), atol=1e-5, rtol=1e-4)
    assert cache.offset == L
    got_nocache = np.array(attn(mx.array(x[None].astype(np.float32)), "causal", None)[0])
    np.testing.assert_allclose(got_nocache, got, atol=1e-5)


@pytest.mark.parametrize("M,w", GEOMS)
def test_prefill_then_decode_across_boundaries(M, w):
    c = M - w
    attn = make_attention(M, w, seed=2)
    L = 2 * c + 1 + c + 2
    x = rng(2).standard_normal((L, attn.n_heads * attn.head_dim))
    want = layer_reference(attn, x, M, w)
    # first succ, clamp start, first inter, first token of a chunk
    for P in (c - 1, c, c + w, c + w + 1, 2 * c - 1, 2 * c):
        got, _ = run_steps(attn, x, [P] + [1] * (L - P))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=f"prefill {P}")


@pytest.mark.parametrize("M,w", GEOMS)
def test_stepwise_prefill_invariance(M, w):
    c = M - w
    attn = make_attention(M, w, seed=3)
    L = 5 * c + 3
    x = rng(3).standard_normal((L, attn.n_heads * attn.head_dim))
    want, cache1 = run_steps(attn, x, [L])
    for step in (1, 5, 7, c, 2 * c + 1):
        steps = [step] * (L // step) + ([L % step] if L % step else [])
        got, cache2 = run_steps(attn, x, steps)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"step {step}")
        k1, v1 = cache1.keys_and_values()
        k2, v2 = cache2.keys_and_values()
        # same keys and values up to the projection's summation order (batch size differs)
        np.testing.assert_allclose(np.array(k2), np.array(k1), atol=1e-6)
        np.testing.assert_allclose(np.array(v2), np.array(v1), atol=1e-6)


def test_generate_prefill_step_size_invariance(tmp_path):
    """generate.py's chunked prefill gives the same tokens and cache for any prefill_step_size."""
    from qwen2_mlx.generation.generate import generate_step

    M, w = 12, 4
    args = ModelArgs(
        model_type="qwen2",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        dual_chunk_attention_config=DCAConfig(M, w, 0),
    )
    mx.random.seed(0)
    model = Model(args)
    prompt = mx.array(rng(4).integers(0, 64, 43), dtype=mx.uint32)
    results = []
    for step in (1, 5, 7, 8, 17, 2048):
        cache = model.make_cache()
        toks = [t for t, _ in generate_step(prompt, model, max_tokens=6, prompt_cache=cache, prefill_step_size=step)]
        results.append((toks, np.array(cache[1].keys_and_values()[0])))
    for toks, keys in results[1:]:
        assert toks == results[0][0]
        np.testing.assert_allclose(keys, results[0][1], atol=1e-5)


@pytest.mark.parametrize("M,w", GEOMS)
def test_cache_contents(M, w):
    c = M - w
    attn = make_attention(M, w, seed=4)
    L = 3 * c + 2
    x = rng(4).standard_normal((L, attn.n_heads * attn.head_dim))
    _, cache = run_steps(attn, x, [L])
    keys = np.array(cache.keys_and_values()[0][0])
    # k as the module computes it (the stacked q/k/v matmul), so the bit-for-bit checks below test RoPE alone.
    qkv = attn._qkv(attn, mx.array(x[None].astype(np.float32)))
    k_raw = qkv[..., attn.n_heads * attn.head_dim : (attn.n_heads + attn.n_kv_heads) * attn.head_dim]
    k_raw = k_raw.reshape(1, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    want = ref.rotate(np.array(k_raw[0], dtype=np.float64), np.arange(L) % c, attn.rope.inv_freq)
    np.testing.assert_allclose(keys, want, atol=1e-5)
    # the first c keys are standard RoPE keys bit for bit; key c is rotated at 0
    plain = np.array(attn.rope(k_raw)[0])
    np.testing.assert_array_equal(keys[:, :c], plain[:, :c])
    np.testing.assert_array_equal(keys[:, c], np.array(attn.rope(k_raw[:, :, c : c + 1]))[0, :, 0])
    assert cache.meta_state == (str(M), str(w), "0")
    # trimming and save/load of the state keep it usable
    assert cache.trim(3) == 3 and cache.offset == L - 3
    clone = DCAKVCache.from_state(cache.state, cache.meta_state)
    assert clone.dca_settings == (M, w, 0) and clone.offset == L - 3
    out_a, _ = run_steps(attn, x[L - 3 :], [1, 1, 1], cache)
    out_b, _ = run_steps(attn, x[L - 3 :], [1, 1, 1], clone)
    np.testing.assert_array_equal(out_a, out_b)


def test_cache_refuses_other_settings():
    attn = make_attention(12, 4)
    x = mx.zeros((1, 3, 32))
    with pytest.raises(ValueError, match="DCA settings"):
        attn(x, "causal", DCAKVCache(16, 4, 0))
    from mlx_lm.models.cache import KVCache

    # a plain cache (a batch's) is plain attention within chunk_size + 1 tokens, as DCA is there; not past it
    x = mx.random.normal((1, 13, 32))
    assert mx.allclose(attn(x, "causal", KVCache()), attn(x, "causal", DCAKVCache(12, 4, 0)), atol=1e-5).item()
    with pytest.raises(TypeError, match="DCAKVCache"):
        attn(mx.zeros((1, 14, 32)), "causal", KVCache())


# ---------------------------------------------------------------------------------------------
# 10. Temperature


def test_temperature_values():
    assert dca_temperature(10**6, 0) == 1.0
    assert dca_temperature(100, 100) == 1.0 and dca_temperature(50, 100) == 1.0
    assert dca_temperature(400, 100) == pytest.approx(1.1386294, abs=1e-7)
    assert dca_temperature(1010000, 262144) == pytest.approx(1.134881, abs=1e-6)


def test_temperature_two_keys_by_hand():
    """Two keys at the same position: softmax weights are exp(s^2 * logit) by hand."""
    M, w, L0 = 12, 4, 1
    attn = make_attention(M, w, L0, Hq=1, Hkv=1, D=8)
    s = dca_temperature(2, L0)
    assert s == pytest.approx(0.1 * math.log(2) + 1)
    x = rng(5).standard_normal((2, 8))
    got, _ = run_steps(attn, x, [2])
    xs = x.astype(np.float64)
    q = xs @ np.array(attn.q_proj.weight, np.float64).T + np.array(attn.q_proj.bias, np.float64)
    k = xs @ np.array(attn.k_proj.weight, np.float64).T + np.array(attn.k_proj.bias, np.float64)
    v = xs @ np.array(attn.v_proj.weight, np.float64).T + np.array(attn.v_proj.bias, np.float64)
    f = attn.rope.inv_freq
    q1 = ref.rotate(q[1], 1, f)
    logits = np.array([q1 @ ref.rotate(k[0], 0, f), q1 @ ref.rotate(k[1], 1, f)]) * s * s / math.sqrt(8)
    p = np.exp(logits - logits.max())
    o1 = (p / p.sum()) @ v
    want = o1 @ np.array(attn.o_proj.weight, np.float64).T
    np.testing.assert_allclose(got[1], want, atol=1e-5, rtol=1e-4)


def test_temperature_vllm_parity():
    """Prompt keys carry s(prompt_len) even when prefilled in steps; decode token t uses s(L_t)."""
    M, w, L0 = 12, 4, 10
    c = M - w
    attn = make_attention(M, w, L0, seed=6)
    P, L = 3 * c + 1, 3 * c + 6
    x = rng(6).standard_normal((L, attn.n_heads * attn.head_dim))
    s_prompt = dca_temperature(P, L0)
    s_row = np.array([s_prompt if i < P else dca_temperature(i + 1, L0) for i in range(L)])
    tau = s_row[:, None] * s_row[None, :]  # query factor of row i times key factor of key j
    want = layer_reference(attn, x, M, w, tau=tau)
    for steps in ([P], [5, 5, 5, P - 15], [1] * P):
        cache = DCAKVCache(M, w, L0)
        cache.length_hint = P
        got, cache = run_steps(attn, x, steps + [1] * (L - P), cache)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=str(steps[:3]))
    keys = np.array(cache.keys_and_values()[0][0])
    # k as the module computes it (the stacked q/k/v matmul), so the bit-for-bit checks below test RoPE alone.
    qkv = attn._qkv(attn, mx.array(x[None].astype(np.float32)))
    k_raw = qkv[..., attn.n_heads * attn.head_dim : (attn.n_heads + attn.n_kv_heads) * attn.head_dim]
    k_raw = k_raw.reshape(1, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    plain = ref.rotate(np.array(k_raw[0], np.float64), np.arange(L) % c, attn.rope.inv_freq)
    np.testing.assert_allclose(keys, plain * s_row[None, :, None], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 11. Merge robustness


@pytest.mark.parametrize("tiling", [{}, {"tile_q": 4, "score_budget": 4 * 4 * 6}])
def test_saturated_softmax_no_nan(tiling):
    M, w = 12, 4
    rope = RoPE(8, 10000.0)
    L = 4 * (M - w) + 1
    q, k, v = qkv(L, seed=7, scale=50.0)
    got = mlx_dca(q, k, v, M, w, rope, **tiling)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref.attention(q, k, v, rope.inv_freq, M, w), atol=1e-4, rtol=1e-4)


def test_fp16_inputs():
    M, w = 12, 4
    rope = RoPE(8, 10000.0)
    L = 4 * (M - w) + 1
    q, k, v = qkv(L, seed=8)
    geom = DCAGeometry(M, w)
    qm, km, vm = (mx.array(a.astype(np.float16))[None] for a in (q, k, v))
    out = dca_attention(
        qm, rotate_keys(rope, km, 0, geom), vm, 0, rope, 8**-0.5, geom, tile_q=4, score_budget=4 * 4 * 6
    )
    assert out.dtype == mx.float16
    got = np.array(out[0].astype(mx.float32))
    want = ref.attention(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), rope.inv_freq, M, w)
    assert np.all(np.isfinite(got))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-3


# ---------------------------------------------------------------------------------------------
# 12. Config parsing


def test_config_1m():
    cfg = {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "rope_theta": 10000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 1010000,
        "dual_chunk_attention_config": {
            "chunk_size": 262144,
            "local_size": 8192,
            "original_max_position_embeddings": 262144,
            "sparse_attention_enabled": True,
            "sparse_attention_threshold": 32768,
        },
    }
    args = ModelArgs.from_dict(cfg)
    geom = DCAGeometry.from_config(args.dual_chunk_attention_config)
    assert (geom.chunk_size, geom.local_size, geom.period, geom.original_max_position_embeddings) == (
        262144,
        8192,
        253952,
        262144,
    )
    assert args.rope_theta == 1e7 and args.rope_scaling is None
    sig = long_context_signature(args)
    assert sig["dual_chunk_attention_config"]["chunk_size"] == 262144 and sig["rope_theta"] == 1e7


def test_config_defaults_and_rejections():
    d = parse_dca({})
    assert (d.chunk_size, d.local_size, d.original_max_position_embeddings) == (8192, 1024, 0)
    with pytest.raises(ConfigError, match="local_size"):
        parse_dca({"chunk_size": 16, "local_size": 16})
    with pytest.raises(ConfigError, match="chunk_size"):
        parse_dca({"chunk_size": "big"})


def test_rope_scaling_with_dca_warns_and_uses_plain_frequencies():
    base = dict(
        model_type="qwen2",
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8,
    )
    for key in ("type", "rope_type"):
        args = ModelArgs.from_dict(
            dict(
                base,
                rope_scaling={key: "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
                dual_chunk_attention_config={"chunk_size": 12, "local_size": 4},
            )
        )
        assert args.rope_type == "yarn"
        with pytest.warns(UserWarning, match="rope_scaling is ignored"):
            model = Model(args)
        rope = model.layers[0].self_attn.rope
        assert rope.freqs is None and rope.attention_scale == 1.0
        np.testing.assert_allclose(rope.inv_freq, 10000.0 ** (-np.arange(0, 8, 2) / 8))
        assert long_context_signature(args)["rope_scaling"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Model(ModelArgs.from_dict(dict(base, dual_chunk_attention_config={"chunk_size": 12, "local_size": 4})))


# ---------------------------------------------------------------------------------------------
# 15. Large offsets


def test_large_offset_rotations():
    """Position segments near 262144: exactly the rope call at each row's own position, and close
    to float64 (mx.fast.rope's fp32 angles drift ~1e-2 rad there, docs/long-context.md §9; a wrong position
    moves the fastest pair by a whole radian)."""
    M, w = ONE_M
    geom = DCAGeometry(M, w)
    c, D = geom.period, 64
    rope = RoPE(D, 1e7)
    x = rng(9).standard_normal((1, 2, 6, D))
    xm = mx.array(x.astype(np.float32))

    def at(pos):  # the rope call at one explicit position per row
        return np.stack(
            [np.array(rope(xm[:, :, t : t + 1], offset=int(p)))[:, :, 0] for t, p in enumerate(pos)], axis=2
        )

    def check(got, pos):
        np.testing.assert_array_equal(np.array(got), at(pos))
        np.testing.assert_allclose(np.array(got), ref.rotate(x, pos, rope.inv_freq), atol=5e-2)

    rows = np.arange(6) + 100
    qi, qs, qn = query_copies(rope, xm, 5 * c + 100, geom)  # chunk 5, succ clamped (100 > w? no: exact)
    check(qi, rows)
    check(qs, np.minimum(rows + c, M))
    check(qn, np.full(6, M))
    qi, qs, qn = query_copies(rope, xm, 7 * c + w - 2, geom)  # the succ clamp begins inside the tile
    check(qs, np.minimum(np.arange(6) + w - 2 + c, M))
    check(rope_constant(rope, xm, M), np.full(6, M))
    check(rotate_keys(rope, xm, 3 * c - 3, geom), (np.arange(6) + 3 * c - 3) % c)


# ---------------------------------------------------------------------------------------------
# 16. On a GPU (Metal or CUDA): the equivalence, multi-chunk, decode and saturation cases in
# float16 / bfloat16 (float32 softmax statistics and merge), against the float64 reference.


@pytest.mark.skipif(not mx.is_available(mx.gpu), reason="needs a GPU (Metal or CUDA)")
@pytest.mark.parametrize("dtype,tol", [(mx.float16, 3e-3), (mx.bfloat16, 1e-2), (mx.float32, 1e-5)])
def test_gpu_half_precision(dtype, tol):
    M, w = 12, 4
    c = M - w
    geom = DCAGeometry(M, w)
    rope = RoPE(64, 10000.0)
    blocked = {"tile_q": 3, "score_budget": 4 * 3 * 5}
    with mx.stream(mx.gpu):
        for L, scale in ((M + 1, 1.0), (5 * c + 3, 1.0), (4 * c + 1, 50.0)):
            q, k, v = (a.astype(np.float32) for a in qkv(L, D=64, seed=L, scale=scale))
            qm, km, vm = (mx.array(a)[None].astype(dtype) for a in (q, k, v))
            keys = rotate_keys(rope, km, 0, geom)
            one = dca_attention(qm, keys, vm, 0, rope, 64**-0.5, geom)
            tiled = dca_attention(qm, keys, vm, 0, rope, 64**-0.5, geom, **blocked)
            # token by token over the same cache
            steps = [
                dca_attention(qm[:, :, t : t + 1], keys[:, :, : t + 1], vm[:, :, : t + 1], t, rope, 64**-0.5, geom)
                for t in range(1, L)
            ]
            dec = mx.concatenate([one[:, :, :1]] + steps, axis=2)
            outs = [np.array(o[0].astype(mx.float32)) for o in (one, tiled, dec)]
            assert all(o.dtype == dtype for o in (one, tiled, dec)) and all(np.all(np.isfinite(o)) for o in outs)
            if scale == 1.0:
                want = ref.attention(
                    *(np.array(a[0].astype(mx.float32), dtype=np.float64) for a in (qm, km, vm)), rope.inv_freq, M, w
                )
            else:  # saturated: half-precision scores are coarse; the merges must still agree
                want = outs[0]
            for o in outs:
                assert np.linalg.norm(o - want) / np.linalg.norm(want) < tol, (str(dtype), L, scale)


def test_the_tile_budget_grows_with_a_gpu_memory_and_stays_on_the_cpu(monkeypatch):
    """A GPU pays a few launches per key block (and a sync past the budget), so its tiles may take a share
    of its memory; the CPU keeps the 32 MB budget the memory figures were measured with."""
    from qwen2_mlx.models import dca

    if mx.default_device() != mx.gpu:
        assert dca.device_score_budget() == dca.SCORE_BUDGET
    monkeypatch.setattr(dca.mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(dca, "_gpu_memory", lambda: 141 * 2**30)
    assert dca.device_score_budget() == 141 * 2**30 // (4 * dca.GPU_SCORE_SHARE)
    monkeypatch.setattr(dca, "_gpu_memory", lambda: 0)  # a backend that names no memory: the CPU's budget
    assert dca.device_score_budget() == dca.SCORE_BUDGET
