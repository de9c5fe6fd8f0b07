"""Parity with transformers on tiny random checkpoints: full forward and prefill-then-decode."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from tiny import DENSE, MOE, make_checkpoint

from qwen2_mlx import load
from qwen2_mlx.loading.loader import load_model

CASES = {
    "dense-untied": (DENSE, {}),
    "dense-tied": (DENSE, {"tie_word_embeddings": True}),
    "moe": (MOE, {"norm_topk_prob": False}),
    "moe-norm-topk": (MOE, {"norm_topk_prob": True}),
    "moe-mlp-only": (MOE, {"num_hidden_layers": 3, "mlp_only_layers": [1]}),
    "moe-sparse-step": (MOE, {"num_hidden_layers": 4, "decoder_sparse_step": 2}),
}


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    base, overrides = CASES[request.param]
    path, ref = make_checkpoint(tmp_path_factory.mktemp(request.param), base, seed=len(request.param), **overrides)
    return path, ref


def tokens(n, seed=0, vocab=500):
    return np.random.RandomState(seed).randint(0, vocab, (1, n))


def reference_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor(ids)).logits.float().numpy()


def test_full_forward_matches_transformers(checkpoint):
    path, ref = checkpoint
    model = load_model(path)
    ids = tokens(48)
    expected = reference_logits(ref, ids)
    out = np.array(model(mx.array(ids)))
    assert np.abs(expected).std() > 0.5  # realistic scale: logits that differ
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_prefill_then_decode_matches_transformers(checkpoint):
    path, ref = checkpoint
    model = load_model(path)
    ids = tokens(40, seed=1)
    expected = reference_logits(ref, ids)
    cache = model.make_cache()
    prefill = 25
    out = [np.array(model(mx.array(ids[:, :prefill]), cache=cache))]
    for t in range(prefill, ids.shape[1]):
        out.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)))
    got = np.concatenate(out, axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert cache[0].offset == ids.shape[1]


def test_gqa_keeps_kv_heads_unrepeated(checkpoint):
    path, _ = checkpoint
    model = load_model(path)
    cache = model.make_cache()
    model(mx.array(tokens(10)), cache=cache)
    k, v = cache[0].keys, cache[0].values
    assert k.shape[1] == DENSE["num_key_value_heads"] and v.shape[1] == DENSE["num_key_value_heads"]


def test_bfloat16_within_tolerance(checkpoint):
    """bfloat16 weights and activations: logits within 0.15 relative to the float32 spread, same argmax mostly."""
    path, ref = checkpoint
    if "moe" in path.name and mx.default_device() == mx.cpu:
        pytest.skip("MLX's CPU backend runs gather_mm (MoE experts) in float32 only")
    model = load_model(path, dtype=mx.bfloat16)
    ids = tokens(32, seed=2)
    expected = reference_logits(ref, ids)
    got = np.array(model(mx.array(ids)).astype(mx.float32))
    scale = np.abs(expected).max()
    per_token = np.abs(got - expected).max(-1)[0]  # (32,)
    if "moe" in path.name:
        # A bfloat16 router may pick another expert where two top-k scores nearly tie: that token's logits
        # then differ by more than rounding (CUDA, first lease: one token at 0.19 of the spread, the rest
        # ~0.02). Rounding bounds every other token; at most 3 of 32 may have switched experts.
        assert (per_token > 0.15 * scale).sum() <= 3, per_token / scale
    else:
        assert per_token.max() <= 0.15 * scale
    agree = (got.argmax(-1) == expected.argmax(-1)).mean()
    assert agree >= 0.8


def test_load_returns_tokenizer_with_chat_template(checkpoint):
    path, _ = checkpoint
    model, tok = load(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") in tok.eos_token_ids


def test_sharded_checkpoint_with_index(tmp_path):
    """Plain HF checkpoints split over several safetensors files with an index load the same."""
    path, ref = make_checkpoint(tmp_path / "one", DENSE, seed=3)
    ref.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="60KB")
    sharded = tmp_path / "sharded"
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").exists()
    (sharded / "config.json").write_text((path / "config.json").read_text())
    ids = tokens(16)
    np.testing.assert_allclose(np.array(load_model(sharded)(mx.array(ids))), reference_logits(ref, ids), atol=1e-4)
