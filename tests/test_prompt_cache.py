"""Prompt caches: save/load round trip, refusal for other long-context settings, trim, reuse."""

from __future__ import annotations

import copy
import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from qwen2_mlx import (
    PromptCacheError,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    prefill_prompt_cache,
    save_prompt_cache,
    stream_generate,
    trim_prompt_cache,
)
from qwen2_mlx.models.config import DCAConfig
from qwen2_mlx.models.model import Model

DOCUMENT = "The quick brown fox jumps over the lazy dog. " * 6


def variant(model, **changes) -> Model:
    """A model with the same shapes and other settings (its weights do not matter here)."""
    args = copy.deepcopy(model.args)
    for k, v in changes.items():
        setattr(args, k, v)
    return Model(args)


def test_round_trip_gives_identical_logits(mt, tmp_path):
    model, tok = mt
    cache = prefill_prompt_cache(model, tok, DOCUMENT)
    n = cache[0].offset
    assert n == len(tok.encode(DOCUMENT, add_special_tokens=False))
    path = tmp_path / "doc.safetensors"
    save_prompt_cache(path, cache, {"title": "fox"}, model=model)
    loaded, meta = load_prompt_cache(path, return_metadata=True, model=model)
    assert meta == {"title": "fox"}
    assert [c.offset for c in loaded] == [n] * len(cache)
    q = mx.array(tok.encode(" Where is the fox?", add_special_tokens=False))[None]
    assert mx.array_equal(model(q, cache=cache), model(q, cache=loaded)).item()
    # and decoding goes on identically from both
    a = [r.token for r in stream_generate(model, tok, [5], max_tokens=6, prompt_cache=cache)]
    b = [r.token for r in stream_generate(model, tok, [5], max_tokens=6, prompt_cache=loaded)]
    assert a == b


def test_a_trimmed_cache_saves_only_what_it_holds(mt, tmp_path):
    model, tok = mt
    cache = prefill_prompt_cache(model, tok, DOCUMENT * 8)
    assert can_trim_prompt_cache(cache)
    n = cache[0].offset
    assert trim_prompt_cache(cache, n - 10) == n - 10
    assert cache[0].offset == 10
    save_prompt_cache(tmp_path / "c.safetensors", cache, model=model)
    loaded = load_prompt_cache(tmp_path / "c.safetensors", model=model)
    assert loaded[0].offset == 10 and loaded[0].keys.shape[2] < 300
    q = mx.array([[7, 8, 9]])
    assert mx.array_equal(model(q, cache=cache), model(q, cache=loaded)).item()


def test_reusing_a_prefilled_cache_equals_generating_from_the_full_prompt(mt):
    model, tok = mt
    question = " Question: what does the fox do?"
    full = [r.token for r in stream_generate(model, tok, DOCUMENT + question, max_tokens=8)]
    cache = prefill_prompt_cache(model, tok, DOCUMENT)
    held = cache[0].offset
    for _ in range(2):  # two questions on one cache, trimming back in between
        rs = list(stream_generate(model, tok, question, max_tokens=8, prompt_cache=cache))
        assert [r.token for r in rs] == full
        assert rs[-1].prompt_tokens == len(tok.encode(question, add_special_tokens=False))
        trim_prompt_cache(cache, cache[0].offset - held)
        assert cache[0].offset == held


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"rope_theta": 500000.0}, "rope_theta"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}},
            "rope_scaling",
        ),
        (
            {
                "dual_chunk_attention_config": DCAConfig(
                    chunk_size=256, local_size=32, original_max_position_embeddings=1024
                )
            },
            "dual_chunk_attention_config",
        ),
    ],
)
def test_refuses_a_model_with_other_long_context_settings(mt, tmp_path, changes, field):
    model, tok = mt
    path = tmp_path / "c.safetensors"
    save_prompt_cache(path, prefill_prompt_cache(model, tok, DOCUMENT), model=model)
    with pytest.raises(PromptCacheError) as e:
        load_prompt_cache(path, model=variant(model, **changes))
    assert str(path) in str(e.value) and field in str(e.value)
    # the other way round too: a cache made under those settings does not load into the plain model
    other = variant(model, **changes)
    save_prompt_cache(tmp_path / "o.safetensors", prefill_prompt_cache(other, tok, "Hello"), model=other)
    with pytest.raises(PromptCacheError, match=field):
        load_prompt_cache(tmp_path / "o.safetensors", model=model)
    assert load_prompt_cache(tmp_path / "o.safetensors", model=other)[0].offset > 0


def test_refuses_other_shapes_even_without_a_signature(mt, tmp_path):
    import mlx_lm.models.cache as mlx_cache

    model, tok = mt
    cache = prefill_prompt_cache(model, tok, "Hello there")
    path = tmp_path / "mlx.safetensors"
    mlx_cache.save_prompt_cache(str(path), cache[:1])  # an mlx-lm file: no signature, one layer
    with pytest.raises(PromptCacheError, match="layers"):
        load_prompt_cache(path, model=model)
    assert len(load_prompt_cache(path)) == 1  # without a model there is nothing to check against


def test_files_are_interchangeable_with_mlx_lm(mt, tmp_path):
    import mlx_lm.models.cache as mlx_cache

    model, tok = mt
    cache = prefill_prompt_cache(model, tok, DOCUMENT)
    save_prompt_cache(tmp_path / "ours.safetensors", cache, {"k": "v"}, model=model)
    theirs, meta = mlx_cache.load_prompt_cache(str(tmp_path / "ours.safetensors"), return_metadata=True)
    assert meta["k"] == "v" and theirs[0].offset == cache[0].offset
    assert "qwen2_mlx_signature" in meta and json.loads(meta["qwen2_mlx_signature"])["num_hidden_layers"] == 2


def test_bad_files_and_arguments_give_clear_errors(mt, tmp_path):
    model, tok = mt
    with pytest.raises(PromptCacheError, match="no such prompt cache file"):
        load_prompt_cache(tmp_path / "missing.safetensors", model=model)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(PromptCacheError, match="junk.safetensors"):
        load_prompt_cache(junk)
    with pytest.raises(PromptCacheError, match="empty"):
        save_prompt_cache(tmp_path / "e.safetensors", make_prompt_cache(model))
    with pytest.raises(PromptCacheError, match=".safetensors"):
        save_prompt_cache(tmp_path / "e.bin", prefill_prompt_cache(model, tok, "Hi"))
    with pytest.raises(PromptCacheError, match="metadata"):
        save_prompt_cache(tmp_path / "e.safetensors", prefill_prompt_cache(model, tok, "Hi"), {"a.b": "c"})
    assert not list(tmp_path.glob("*.tmp*"))


def test_dca_cache_round_trip_keeps_its_settings(mt, tmp_path):
    from qwen2_mlx.models.kv_cache import DCAKVCache

    model, tok = mt
    dca = variant(model, dual_chunk_attention_config=DCAConfig(chunk_size=16, local_size=4))
    dca.load_weights(list(tree_flatten(model.parameters())))
    cache = prefill_prompt_cache(dca, tok, DOCUMENT)  # far past one chunk: the DCA path is active
    assert isinstance(cache[0], DCAKVCache) and cache[0].offset > 40
    save_prompt_cache(tmp_path / "dca.safetensors", cache, model=dca)
    loaded = load_prompt_cache(tmp_path / "dca.safetensors", model=dca)
    assert isinstance(loaded[0], DCAKVCache) and loaded[0].dca_settings == cache[0].dca_settings == (16, 4, 0)
    q = mx.array(tok.encode(" Where is the fox?", add_special_tokens=False))[None]
    assert mx.array_equal(dca(q, cache=cache), dca(q, cache=loaded)).item()
    with pytest.raises(PromptCacheError, match="dual_chunk_attention_config"):
        load_prompt_cache(tmp_path / "dca.safetensors", model=model)
