"""Long context on by default: which method `load` picks, the context limit, and that the default DCA
is plain attention (equal logits) up to `chunk_size + 1` tokens and really engages past them."""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np
import pytest
from api_support import real_model_or_skip, tiny_model

from qwen2_mlx import load
from qwen2_mlx.arguments import add_long_context_args, long_context_overrides
from qwen2_mlx.generation.generate import context_limit
from qwen2_mlx.models.config import ConfigError, DCAConfig
from qwen2_mlx.models.long_context import default_dca, resolve_long_context

WINDOW = 64  # the tiny checkpoints' trained window here, so DCA engages within a test's budget


def logits(model, ids: list[int], step: int = 0) -> np.ndarray:
    """Logits of every position through the model's own cache, prefilled `step` tokens at a time."""
    cache, out = model.make_cache(), []
    step = step or len(ids)
    for a in range(0, len(ids), step):
        out.append(model(mx.array(ids[a : a + step])[None], cache=cache)[0])
    return np.array(mx.concatenate(out).astype(mx.float32))


def test_default_geometry_and_modes(tmp_path_factory):
    model, _, _ = tiny_model(tmp_path_factory)
    assert default_dca(32768) == DCAConfig(32768, 4096, 0)
    plain = model.args
    auto = resolve_long_context(resolve_long_context(plain, "off"), "auto")  # a config naming nothing gets DCA
    assert auto.dual_chunk_attention_config == default_dca(plain.max_position_embeddings)
    assert resolve_long_context(auto, "off").dual_chunk_attention_config is None
    yarn = resolve_long_context(plain, "yarn")
    assert yarn.dual_chunk_attention_config is None and yarn.rope_scaling["factor"] == 4.0
    assert resolve_long_context(yarn, "auto").rope_scaling == yarn.rope_scaling  # the config's method stays
    own = resolve_long_context(plain, "auto", dca={"chunk_size": 100, "local_size": 10})
    assert own.dual_chunk_attention_config == DCAConfig(100, 10, 0)  # settings given still win
    with pytest.raises(ConfigError, match="long_context"):
        resolve_long_context(plain, "sometimes")
    with pytest.raises(ConfigError, match="dca"):
        resolve_long_context(plain, "off", dca={"chunk_size": 100})


def test_context_limits(tmp_path_factory):
    _, _, path = tiny_model(tmp_path_factory)
    window = load(path, long_context="off")[0].args.max_position_embeddings
    assert context_limit(load(path)[0]) == 4 * window
    assert context_limit(load(path, long_context="off")[0]) == window
    assert context_limit(load(path, long_context="yarn")[0]) == 4 * window
    assert context_limit(load(path, max_context=1000)[0]) == 1000
    with pytest.raises(ConfigError, match="max_context"):
        load(path, max_context=0)


def test_switches(tmp_path_factory):
    p = add_long_context_args(argparse.ArgumentParser())
    o = long_context_overrides(p.parse_args(["--long-context", "off", "--max-context", "5000"]), p)
    assert o["long_context"] == "off" and o["max_context"] == 5000
    with pytest.raises(SystemExit):
        long_context_overrides(p.parse_args(["--long-context", "off", "--dca-chunk-size", "64"]), p)
    with pytest.raises(SystemExit):
        p.parse_args(["--long-context", "maybe"])


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_default_dca_is_plain_attention_up_to_the_window_and_engages_past_it(tmp_path_factory, kind):
    _, _, path = tiny_model(tmp_path_factory, kind, max_position_embeddings=WINDOW)
    default, _ = load(path)
    plain, _ = load(path, long_context="off")
    assert default.args.dual_chunk_attention_config == DCAConfig(WINDOW, WINDOW // 8, 0)
    assert plain.args.dual_chunk_attention_config is None
    ids = np.random.default_rng(0).integers(0, 500, 3 * WINDOW).tolist()
    n = WINDOW + 1  # DCA's plain range: chunk_size + 1 tokens
    for step in (0, 16):  # one prefill and stepwise (decode-like) through the cache
        a, b = logits(default, ids[:n], step), logits(plain, ids[:n], step)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    a, b = logits(default, ids, 16), logits(plain, ids, 16)
    np.testing.assert_allclose(a[:n], b[:n], rtol=1e-4, atol=1e-4)
    assert np.abs(a[n + WINDOW :] - b[n + WINDOW :]).max() > 1e-2  # past the window DCA is not plain


@pytest.mark.real_model
def test_real_model_default_equals_plain_below_its_window(request):
    model, tok = real_model_or_skip(request)
    real_model_path = request.getfixturevalue("real_model_path")
    assert model.args.dual_chunk_attention_config == DCAConfig(32768, 4096, 0)
    assert context_limit(model) == 131072
    plain, _ = load(real_model_path, long_context="off")
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 12
    ids = tok.encode(text, add_special_tokens=False)[:300]
    assert len(ids) == 300
    a, b = logits(model, ids, 128), logits(plain, ids, 128)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    assert (a.argmax(-1) == b.argmax(-1)).all()
