"""Static YaRN as Qwen2 checkpoints expect it (docs/long-context.md §2), against transformers and mlx-lm."""

from __future__ import annotations

import math

import dca_reference as ref
import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx.models.attention import Attention
from qwen2_mlx.models.config import ModelArgs
from qwen2_mlx.models.rope import RoPE, plain_inv_freq, yarn_parameters


def hf_yarn(D, base, scaling, max_pos=32768):
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    cfg = Qwen2Config(
        hidden_size=D * 2,
        num_attention_heads=2,
        max_position_embeddings=max_pos,
        rope_parameters=dict(scaling, rope_type="yarn", rope_theta=base),
    )
    inv, af = _compute_yarn_parameters(cfg)
    return inv.double().numpy(), af


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("base", [1e6, 1e7])
@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
def test_frequencies_match_transformers_and_mlx_lm(D, base, factor):
    from mlx_lm.models.rope_utils import YarnRoPE

    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 32768}
    rope = RoPE(D, base, scaling=scaling, max_position_embeddings=131072)
    inv_hf, af_hf = hf_yarn(D, base, scaling)
    np.testing.assert_allclose(rope.inv_freq, inv_hf, rtol=1e-6)
    # mx.fast.rope takes periods: what the rope call actually uses
    np.testing.assert_allclose(1.0 / np.array(rope.freqs, dtype=np.float64), inv_hf, rtol=1e-6)
    assert rope.attention_scale == pytest.approx(af_hf**2, rel=1e-12)
    ml = YarnRoPE(
        D, base=base, scaling_factor=factor, original_max_position_embeddings=32768, max_position_embeddings=131072
    )
    np.testing.assert_allclose(1.0 / np.array(ml._freqs, dtype=np.float64), rope.inv_freq, rtol=1e-6)
    assert ml.mscale == pytest.approx(math.sqrt(rope.attention_scale), rel=1e-6)


def test_qwen_7b_values():
    """D = 128, theta = 1e6, f = 4, L = 32768: ramp from pair 23 to 40, logits x 1.2964770."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    inv, af = yarn_parameters(128, 1e6, scaling, 131072)
    plain = plain_inv_freq(128, 1e6)
    np.testing.assert_allclose(inv[:24], plain[:24], rtol=1e-12)  # d <= lo keeps theta_d
    np.testing.assert_allclose(inv[40:], plain[40:] / 4, rtol=1e-12)  # d >= hi: theta_d / f
    assert np.all(inv[24:40] < plain[24:40]) and np.all(inv[24:40] > plain[24:40] / 4)
    assert af == pytest.approx(1.1386294, abs=1e-7) and af * af == pytest.approx(1.2964770, abs=1e-7)
    inv64, _ = yarn_parameters(64, 1e6, scaling, 131072)
    p64 = plain_inv_freq(64, 1e6)
    np.testing.assert_allclose(inv64[:12], p64[:12], rtol=1e-12)  # lo = 11, hi = 20
    np.testing.assert_allclose(inv64[20:], p64[20:] / 4, rtol=1e-12)
    assert inv64[12] < p64[12] and inv64[19] > p64[19] / 4


def test_factor_at_most_one_and_options():
    _, af = yarn_parameters(64, 1e6, {"factor": 1.0, "original_max_position_embeddings": 4096}, 4096)
    assert af == 1.0
    _, af = yarn_parameters(64, 1e6, {"factor": 0.5, "original_max_position_embeddings": 4096}, 4096)
    assert af == 1.0
    for extra in (
        {"truncate": False},
        {"beta_fast": 16, "beta_slow": 2},
        {"attention_factor": 1.5},
        {},
    ):  # missing original_max_position_embeddings: max_position_embeddings
        scaling = dict({"factor": 4.0, "original_max_position_embeddings": 8192}, **extra)
        if not extra:
            scaling.pop("original_max_position_embeddings")
        inv, af = yarn_parameters(64, 1e6, scaling, 8192)
        inv_hf, af_hf = hf_yarn(64, 1e6, scaling, max_pos=8192)
        np.testing.assert_allclose(inv, inv_hf, rtol=1e-6, err_msg=str(extra))
        assert af == pytest.approx(af_hf, rel=1e-12)


def test_yarn_attention_is_plain_softmax_with_mscale_squared():
    """The module's YaRN attention == softmax(mscale^2 q'k'/sqrt(D)) with YaRN-rotated q', k'."""
    Hq, Hkv, D, L = 4, 2, 16, 40
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    args = ModelArgs(
        model_type="qwen2",
        hidden_size=Hq * D,
        num_hidden_layers=1,
        intermediate_size=8,
        num_attention_heads=Hq,
        num_key_value_heads=Hkv,
        vocab_size=8,
        rope_scaling=scaling,
    )
    mx.random.seed(0)
    attn = Attention(args)
    r = np.random.default_rng(0)
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        lin.bias = mx.array(r.standard_normal(lin.bias.shape).astype(np.float32) * 0.5)
    x = r.standard_normal((L, Hq * D))
    got = np.array(attn(mx.array(x[None].astype(np.float32)), "causal", None)[0])

    def proj(lin, heads):
        y = x @ np.array(lin.weight, np.float64).T + np.array(lin.bias, np.float64)
        return y.reshape(L, heads, D).transpose(1, 0, 2)

    mscale = 0.1 * math.log(4.0) + 1
    o = ref.attention(
        proj(attn.q_proj, Hq), proj(attn.k_proj, Hkv), proj(attn.v_proj, Hkv), attn.rope.inv_freq, tau=mscale**2
    )
    want = o.transpose(1, 0, 2).reshape(L, -1) @ np.array(attn.o_proj.weight, np.float64).T
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
