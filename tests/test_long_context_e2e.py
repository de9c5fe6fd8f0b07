"""YaRN and Dual Chunk Attention end to end on tiny random dense and MoE checkpoints.

YaRN: logits equal transformers' past original_max_position_embeddings. DCA: logits equal a
float64 transformers model whose attention is replaced by the independent per-pair reference
(tests/dca_reference.py), in one-shot prefill and in token-by-token decode.
"""

from __future__ import annotations

import copy
import json

import dca_reference as ref
import mlx.core as mx
import numpy as np
import pytest
import torch
from tiny import DENSE, MOE, make_checkpoint

from qwen2_mlx import load
from qwen2_mlx.generation.generate import generate_step
from qwen2_mlx.models.rope import plain_inv_freq

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
DCA = {"chunk_size": 16, "local_size": 4}  # c = 12


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 500, n)


@pytest.fixture(scope="module", params=["dense", "moe"])
def yarn_checkpoint(request, tmp_path_factory):
    """A transformers YaRN model; its folder's config.json has no rope_scaling (we pass it as an override)."""
    base = DENSE if request.param == "dense" else MOE
    path, model = make_checkpoint(tmp_path_factory.mktemp(f"yarn-{request.param}"), base, rope_scaling=dict(YARN))
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    (path / "config.json").write_text(json.dumps(cfg))
    return path, model


def test_yarn_logits_match_transformers(yarn_checkpoint):
    path, tm = yarn_checkpoint
    assert tm.config.rope_parameters["rope_type"] == "yarn"
    ids = tokens(200, seed=1)  # 200 > original_max_position_embeddings = 64
    with torch.no_grad():
        want = tm(torch.tensor(ids)[None]).logits[0].numpy()
    model, _ = load(path, rope_scaling=dict(YARN))
    got = np.array(model(mx.array(ids)[None])[0])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    plain, _ = load(path)  # the override is what made the difference
    assert np.abs(np.array(plain(mx.array(ids)[None])[0]) - want).max() > 1e-2


@pytest.fixture(scope="module", params=["dense", "moe"])
def dca_checkpoint(request, tmp_path_factory):
    base = DENSE if request.param == "dense" else MOE
    return make_checkpoint(tmp_path_factory.mktemp(f"dca-{request.param}"), base, seed=3)


def reference_dca_logits(tm, ids, chunk_size, local_size):
    """float64 transformers forward with the per-pair DCA reference as its attention function.

    Position ids are all 0, so transformers' own rotary embedding is the identity and the
    reference receives the raw (biased) q and k and applies DCA positions itself.
    """
    from transformers import AttentionInterface

    cfg = tm.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq = plain_inv_freq(D, cfg.rope_parameters["rope_theta"])

    def dca_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        out = [
            ref.attention(q.numpy(), k.numpy(), v.numpy(), inv_freq, chunk_size, local_size)
            for q, k, v in zip(query, key, value)
        ]
        return torch.from_numpy(np.stack(out)).transpose(1, 2).to(query.dtype), None

    AttentionInterface.register("dca_reference", dca_reference_attention)
    m64 = type(tm)(copy.deepcopy(cfg)).double()  # its own config: tm keeps its attention
    m64.load_state_dict({k: v.double() for k, v in tm.state_dict().items()})
    m64.eval()
    m64.set_attn_implementation("dca_reference")
    m64.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    with torch.no_grad():
        pos = torch.zeros((1, len(ids)), dtype=torch.long)
        return m64(torch.tensor(ids)[None], position_ids=pos).logits[0].numpy()


def test_dca_logits_match_reference_prefill_and_decode(dca_checkpoint):
    path, tm = dca_checkpoint
    c = DCA["chunk_size"] - DCA["local_size"]
    ids = tokens(5 * c + 3, seed=2)  # five chunks and a bit: intra, succ (exact and clamped), inter
    want = reference_dca_logits(tm, ids, DCA["chunk_size"], DCA["local_size"])
    model, _ = load(path, dca=dict(DCA))
    got = np.array(model(mx.array(ids)[None], cache=model.make_cache())[0])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    cache = model.make_cache()
    steps = [np.array(model(mx.array(ids[t : t + 1])[None], cache=cache)[0, 0]) for t in range(len(ids))]
    np.testing.assert_allclose(np.stack(steps), want, atol=1e-4, rtol=1e-4)
    # sanity: the reference really is DCA (plain attention differs past M + 1)
    with torch.no_grad():
        plain = tm(torch.tensor(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(plain[: DCA["chunk_size"] + 1], want[: DCA["chunk_size"] + 1], atol=1e-4, rtol=1e-4)
    assert np.abs(plain[DCA["chunk_size"] + 1 :] - want[DCA["chunk_size"] + 1 :]).max() > 1e-2


def test_dca_short_inputs_equal_plain_model(dca_checkpoint):
    """chunk_size 32, local_size 8: every input of at most 33 tokens gives the plain model's logits."""
    path, _ = dca_checkpoint
    plain, _ = load(path)
    dca, _ = load(path, dca={"chunk_size": 32, "local_size": 8})
    ids = tokens(33, seed=4)
    for L in (1, 23, 24, 25, 32, 33):
        a = np.array(plain(mx.array(ids[:L])[None])[0])
        b = np.array(dca(mx.array(ids[:L])[None], cache=dca.make_cache())[0])
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4, err_msg=f"L={L}")


def test_dca_greedy_generation_equals_fresh_prefill(dca_checkpoint):
    """Greedy decoding through the cache across chunk edges == a fresh full prefill at every step."""
    path, _ = dca_checkpoint
    model, _ = load(path, dca=dict(DCA))
    prompt = [int(t) for t in tokens(10, seed=5)]
    got = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=30, prefill_step_size=4)]
    seq = list(prompt)
    for _ in range(30):
        logits = model(mx.array(seq)[None], cache=model.make_cache())[0, -1]
        seq.append(int(mx.argmax(logits).item()))
    assert got == seq[len(prompt) :]
