"""The compiled decode step (decode.py): same greedy tokens as the plain path, and clean fallbacks."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, QuantizedKVCache

import qwen2_mlx
from qwen2_mlx.generation.prompt_cache import make_prompt_cache
from qwen2_mlx.decode import DISABLE_ENV, FastDecoder, decode_step, fast_decode_applies, fast_decoder
from qwen2_mlx.generation.generate import generate_step
from tiny import DENSE, MOE, make_checkpoint

PROMPT = mx.array([5, 17, 33, 2, 9, 100, 200, 7, 64], dtype=mx.uint32)
# On a CPU the stacked matmuls are bitwise equal to the separate ones. CUDA may pick another matmul
# kernel for the stacked shape (float32 logits then differ by ~1e-3), so there only closeness holds.
ON_CPU = mx.default_device().type == mx.cpu


def same(a: mx.array, b: mx.array) -> bool:
    return mx.array_equal(a, b).item() if ON_CPU else mx.allclose(a, b, atol=5e-3, rtol=5e-3).item()


@pytest.fixture(scope="module", params=["dense", "moe"])
def tiny_model(request, tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp(request.param), DENSE if request.param == "dense" else MOE)
    model, _ = qwen2_mlx.load(path)
    return model


def _generate(model, monkeypatch, fast: bool, n: int, prompt=PROMPT, cache=None):
    monkeypatch.setenv(DISABLE_ENV, "0" if fast else "1")
    out = [(t, lp) for t, lp in generate_step(prompt, model, max_tokens=n, prompt_cache=cache)]
    return [t for t, _ in out], mx.stack([lp for _, lp in out])


def test_greedy_tokens_identical_across_cache_growth(tiny_model, monkeypatch):
    # 300 tokens cross KVCache's 256-position growth, where the compiled step is retraced.
    plain_tokens, plain_lp = _generate(tiny_model, monkeypatch, False, 300)
    fast_tokens, fast_lp = _generate(tiny_model, monkeypatch, True, 300)
    assert fast_tokens == plain_tokens
    assert len(set(plain_tokens)) > 5  # a degenerate repetition would prove little
    assert same(fast_lp, plain_lp)


def test_fast_path_is_taken_and_keeps_the_cache_consistent(tiny_model, monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "0")
    cache = make_prompt_cache(tiny_model)
    tiny_model(PROMPT[None], cache=cache)
    calls = []
    orig = FastDecoder.__call__
    monkeypatch.setattr(FastDecoder, "__call__", lambda self, t, c: calls.append(1) or orig(self, t, c))
    logits = decode_step(tiny_model, mx.array([3], dtype=mx.uint32), cache)
    assert calls and logits.shape == (1, tiny_model.args.vocab_size)
    assert all(c.offset == PROMPT.size + 1 for c in cache)
    # The plain forward of the same token on the same cache gives the same logits.
    for c in cache:
        c.trim(1)
    ref = tiny_model(mx.array([[3]], dtype=mx.uint32), cache=cache)[:, -1, :]
    assert same(logits, ref)


def test_multi_turn_prompt_cache_and_trim(tiny_model, monkeypatch):
    """A reused, trimmed cache (chat turns) gives the same tokens on both paths."""
    def turns(fast):
        monkeypatch.setenv(DISABLE_ENV, "0" if fast else "1")
        cache = make_prompt_cache(tiny_model)
        first = [t for t, _ in generate_step(PROMPT, tiny_model, max_tokens=20, prompt_cache=cache)]
        for c in cache:
            c.trim(7)  # drop the tail, as prompt-cache reuse does; stale positions must stay masked
        second = [t for t, _ in generate_step(mx.array([11, 12], dtype=mx.uint32), tiny_model, max_tokens=20,
                                              prompt_cache=cache)]
        return first, second, cache[0].offset
    assert turns(True) == turns(False)


def test_falls_back_for_quantized_kv_cache_and_dca(tmp_path, monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "0")
    # head_dim 32: the smallest group size mx.quantize takes.
    path, _ = make_checkpoint(tmp_path / "m", DENSE, num_attention_heads=2, num_key_value_heads=1)
    model, _ = qwen2_mlx.load(path)
    cache = make_prompt_cache(model)
    assert not fast_decode_applies(model, cache)  # empty cache: the plain step fills it first
    model(PROMPT[None], cache=cache)
    assert fast_decode_applies(model, cache)
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert not fast_decode_applies(model, cache)
    monkeypatch.setenv(DISABLE_ENV, "0")
    quantized = [QuantizedKVCache(group_size=32, bits=8) for _ in model.layers]
    model(PROMPT[None], cache=quantized)
    assert decode_step(model, mx.array([1], dtype=mx.uint32), quantized) is None
    dca_model, _ = qwen2_mlx.load(path, dca={"chunk_size": 16, "local_size": 4})
    dca_cache = make_prompt_cache(dca_model)
    dca_model(PROMPT[None], cache=dca_cache)
    assert type(dca_cache[0]) is not KVCache
    assert decode_step(dca_model, mx.array([1], dtype=mx.uint32), dca_cache) is None
    # A plain KVCache given to a DCA model still takes the model's own (DCA) forward.
    assert not fast_decode_applies(dca_model, cache)


def test_quantized_weights_are_stacked_too(tmp_path, monkeypatch):
    import mlx.nn as nn

    path, _ = make_checkpoint(tmp_path / "m", DENSE)
    model, _ = qwen2_mlx.load(path)
    nn.quantize(model, group_size=32, bits=4)
    plain_tokens, plain_lp = _generate(model, monkeypatch, False, 40)
    fast_tokens, fast_lp = _generate(model, monkeypatch, True, 40)
    assert isinstance(fast_decoder(model).layers[0].qkv, nn.QuantizedLinear)
    assert fast_tokens == plain_tokens
    assert same(fast_lp, plain_lp)


def test_batch_of_two_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "0")
    path, _ = make_checkpoint(tmp_path / "m", DENSE)
    model, _ = qwen2_mlx.load(path)
    cache = make_prompt_cache(model)
    model(mx.stack([PROMPT, PROMPT]), cache=cache)
    assert not fast_decode_applies(model, cache)


def test_stacked_weights_are_views_and_follow_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "0")
    path, _ = make_checkpoint(tmp_path / "m", DENSE)
    model, _ = qwen2_mlx.load(path)
    before = {k: mx.array(v) for k, v in tree_flatten(model.parameters())}
    cache = make_prompt_cache(model)
    model(PROMPT[None], cache=cache)
    tok = mx.array([3], dtype=mx.uint32)
    first = decode_step(model, tok, cache)
    dec = fast_decoder(model)
    layer = model.layers[0]
    assert dec.layers[0].qkv is not None and dec.layers[0].gate_up is not None
    # Same values as loaded, and no second copy: the module tensors are views of the stacked ones.
    after = dict(tree_flatten(model.parameters()))
    assert all(mx.array_equal(before[k], after[k]).item() for k in before)
    stacked = dec.layers[0].qkv["weight"]
    assert layer.self_attn.q_proj.weight.shape[0] + layer.self_attn.k_proj.weight.shape[0] + \
        layer.self_attn.v_proj.weight.shape[0] == stacked.shape[0]
    # New weights loaded into the same model object are picked up, not shadowed by stale stacks.
    model.load_weights([(k, v * 0.5 if (".mlp." in k or "self_attn" in k) else v) for k, v in before.items()])
    for c in cache:
        c.trim(1)
    second = decode_step(model, tok, cache)
    for c in cache:
        c.trim(1)
    ref = model(tok[None], cache=cache)[:, -1, :]
    assert not mx.allclose(first, second).item()
    assert same(second, ref)


@pytest.mark.real_model
def test_real_model_greedy_tokens_identical(real_model, monkeypatch):
    model, tokenizer = real_model
    prompt = mx.array(tokenizer.encode("def quicksort(xs):\n    ", add_special_tokens=False), dtype=mx.uint32)
    plain_tokens, plain_lp = _generate(model, monkeypatch, False, 16, prompt=prompt)
    fast_tokens, fast_lp = _generate(model, monkeypatch, True, 16, prompt=prompt)
    assert fast_tokens == plain_tokens
    assert same(fast_lp, plain_lp)
