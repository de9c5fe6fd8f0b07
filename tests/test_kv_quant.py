"""Quantized KV caches (kv_bits, kv_group_size, quantized_kv_start): DCA layers, generation, chats, files."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
from api_support import tiny_model
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from test_dca import make_attention, rng, run_steps

from qwen2_mlx import Chat, batch_generate, generate_step, stream_generate
from qwen2_mlx.bench.long_runs import twin
from qwen2_mlx.generation.kv_quant import KVQuantization, QuantizedBatchKVCache
from qwen2_mlx.generation.prompt_cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from qwen2_mlx.models.config import DCAConfig
from qwen2_mlx.models.dca import QuantizedKV, dca_attention
from qwen2_mlx.models.kv_cache import DCAKVCache, QuantizedDCAKVCache
from qwen2_mlx.models.model import Model

PROMPT = "The quick brown fox jumps over the lazy dog. Hello, how are you? I am fine, thank you. The quick"


def fake_quant(x: mx.array, group_size: int, bits: int) -> mx.array:
    return mx.dequantize(*mx.quantize(x, group_size=group_size, bits=bits), group_size=group_size, bits=bits)


class RoundTripDCACache(DCAKVCache):
    """The oracle: a float DCA cache holding exactly the values a quantized one would (quantize, dequantize)."""

    def __init__(self, group_size, bits, *dca):
        super().__init__(*dca)
        self.group_size_, self.bits_ = group_size, bits

    def update_and_fetch(self, keys, values):
        return super().update_and_fetch(
            fake_quant(keys, self.group_size_, self.bits_), fake_quant(values, self.group_size_, self.bits_)
        )


@pytest.fixture(autouse=True, params=["dequantized reads", "quantized reads"])
def reads(request, monkeypatch):
    """Every test runs both ways a quantized cache can be read (on a CPU they differ: kv_cache.py)."""
    import qwen2_mlx.models.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "QUANTIZED_READS_ON_CPU", request.param == "quantized reads")
    return request.param


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny model whose head size (32) takes quantization groups of 32."""
    model, tok, _ = tiny_model(tmp_path_factory, hidden_size=128)
    return model, tok


def dca_twin(model, chunk_size=24, local_size=6, original=40):
    args = copy.deepcopy(model.args)
    args.dual_chunk_attention_config = DCAConfig(chunk_size, local_size, original)
    twin = Model(args)
    twin.load_weights(list(tree_flatten(model.parameters())))
    return twin


# --- DCA attention over a quantized cache --------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M,w", [(12, 4), (9, 3)])
def test_quantized_dca_equals_dca_over_the_values_it_stores(bits, M, w):
    """Through five chunks, in one prefill, token by token and in odd steps, with a DCA temperature:
    a quantized cache gives what DCA gives over the dequantized values (the quantized matmuls are exact),
    and stays within the quantization error of the float cache."""
    c = M - w
    attn = make_attention(M, w, L0=10, D=32, seed=2)
    L = 5 * c + 3
    x = rng(2).standard_normal((L, attn.n_heads * attn.head_dim))
    for steps in ([L], [c - 1] + [1] * (L - c + 1), [c + 1] + [1] * (L - c - 1), [3] * (L // 3) + [L % 3]):
        steps = [n for n in steps if n]
        got, cache = run_steps(attn, x, steps, cache=QuantizedDCAKVCache(32, bits, M, w, 10))
        oracle, _ = run_steps(attn, x, steps, cache=RoundTripDCACache(32, bits, M, w, 10))
        plain, _ = run_steps(attn, x, steps)
        np.testing.assert_allclose(got, oracle, atol=2e-5, err_msg=f"steps {steps[:2]}")
        # the stated tolerance against the float cache: 1.5 % (8 bits) and 15 % (4 bits) of the largest output
        assert np.abs(got - plain).max() <= (0.015 if bits == 8 else 0.15) * np.abs(plain).max()
        assert cache.offset == L and isinstance(cache.keys, tuple) and cache.keys[0].dtype == mx.uint32


def test_dca_attention_reads_quantized_keys_as_stored():
    """dca_attention on QuantizedKV triples equals dca_attention on their dequantized values (tiles, blocks)."""
    attn = make_attention(12, 4, D=64, seed=5)
    q = mx.array(rng(5).standard_normal((1, 4, 30, 64)).astype(np.float32))
    k = mx.array(rng(6).standard_normal((1, 2, 70, 64)).astype(np.float32))
    v = mx.array(rng(7).standard_normal((1, 2, 70, 64)).astype(np.float32))
    for gs, bits in ((64, 8), (32, 4)):
        qk, qv = (QuantizedKV(*mx.quantize(t, group_size=gs, bits=bits), gs, bits) for t in (k, v))
        dk, dv = (fake_quant(t, gs, bits) for t in (k, v))
        for budget in (1 << 23, 300):  # one concatenated softmax, and the blockwise log-sum-exp merge
            got = dca_attention(q, qk, qv, 40, attn.rope, 0.125, attn.dca, score_budget=budget)
            want = dca_attention(q, dk, dv, 40, attn.rope, 0.125, attn.dca, score_budget=budget)
            np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5)
        got = dca_attention(q[:, :, :1], qk, qv, 69, attn.rope, 0.125, attn.dca)  # the one-token decode path
        want = dca_attention(q[:, :, :1], dk, dv, 69, attn.rope, 0.125, attn.dca)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5)


def test_dca_cache_converts_with_its_settings():
    cache = DCAKVCache(24, 6, 40)
    cache.update_and_fetch(*(mx.ones((1, 2, 10, 32)) for _ in range(2)))
    cache.length_hint = 99
    q = cache.to_quantized(group_size=32, bits=8)
    assert isinstance(q, QuantizedDCAKVCache) and (q.bits, q.group_size) == (8, 32)
    assert q.dca_settings == (24, 6, 40) and q.length_hint == 99 and q.offset == 10
    assert q.keys[0].shape[2] == cache.keys.shape[2]  # its spare room too, as mlx-lm's to_quantized
    assert q.trim(3) == 3 and q.offset == 7 and q.length_hint == 0


# --- generation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,start", [(8, 0), (4, 0), (8, 20)])
def test_plain_model_matches_mlx_lm(wide, bits, start):
    """Our generate_step with kv_bits gives mlx-lm's tokens with the same settings (its rule, its cache class),
    and so does the default model (DCA, inside its window) on its own cache class."""
    default, tok = wide
    model = twin(default, None)  # plain attention: long_context="off"
    prompt = mx.array(tok.encode(PROMPT, add_special_tokens=False), dtype=mx.uint32)
    kw = dict(kv_bits=bits, kv_group_size=32, quantized_kv_start=start)
    theirs = [t for t, _ in mlx_lm_generate_step(prompt, model, max_tokens=24, **kw)]
    for m, kind in ((model, QuantizedKVCache), (default, QuantizedDCAKVCache)):
        ours_cache = make_prompt_cache(m)
        ours = [t for t, _ in generate_step(prompt, m, max_tokens=24, prompt_cache=ours_cache, **kw)]
        assert ours == theirs
        assert all(type(c) is kind and c.bits == bits for c in ours_cache)


def test_dca_generation_is_close_to_the_float_cache(wide):
    """A DCA model (chunks of 24 tokens) decoding well past three chunks: 8-bit keys and values move
    the logits a little and leave greedy tokens unchanged; the float part before quantized_kv_start too."""
    model, tok = wide
    dca = dca_twin(model)
    prompt = mx.array(tok.encode(PROMPT * 3, add_special_tokens=False), dtype=mx.uint32)
    assert prompt.size > 3 * 24

    def run(**kw):
        cache = make_prompt_cache(dca)
        out = list(generate_step(prompt, dca, max_tokens=16, prompt_cache=cache, prefill_step_size=17, **kw))
        return [t for t, _ in out], np.stack([np.array(lp) for _, lp in out]), cache

    ref_tokens, ref_lp, _ = run()
    tokens, lp, cache = run(kv_bits=8, kv_group_size=32)
    assert tokens == ref_tokens
    assert np.abs(lp - ref_lp).max() < 0.05
    assert all(type(c) is QuantizedDCAKVCache and c.dca_settings == (24, 6, 40) for c in cache)
    _, lp_late, cache = run(kv_bits=8, kv_group_size=32, quantized_kv_start=10_000)
    np.testing.assert_allclose(lp_late, ref_lp, atol=1e-5)  # never reached: the float cache throughout
    assert all(type(c) is DCAKVCache for c in cache)


def test_speculative_decoding_with_a_quantized_cache(wide):
    """Prompt lookup and a draft model over 8-bit caches give the plain 8-bit greedy tokens, and the
    caller's cache list ends up holding the quantized layers of both models."""
    model, tok = wide
    kw = dict(kv_bits=8, kv_group_size=32)
    plain = [r.token for r in stream_generate(model, tok, PROMPT, 24, **kw)]
    looked = [r.token for r in stream_generate(model, tok, PROMPT, 24, lookup=True, **kw)]
    assert looked == plain
    cache = make_prompt_cache(model) + make_prompt_cache(model)
    drafted = [r.token for r in stream_generate(model, tok, PROMPT, 24, draft_model=model, prompt_cache=cache, **kw)]
    assert drafted == plain
    assert all(isinstance(c, QuantizedKVCache) for c in cache)
    assert cache[-1].offset <= cache[0].offset  # the draft's cache holds a prefix of the model's


def test_batch_generate_with_a_quantized_cache(wide):
    model, tok = wide
    prompts = ["Hello, how", "The quick brown fox jumps over the lazy", "你好", "def main():\n    return"]
    kw = dict(kv_bits=8, kv_group_size=32)
    res = batch_generate(model, tok, prompts, max_tokens=[12, 5, 12, 9], batch_size=3, **kw)
    for p, m, ids in zip(prompts, [12, 5, 12, 9], res.token_ids):
        assert [r.token for r in stream_generate(model, tok, p, m, **kw)] == ids


def test_quantized_batch_cache_filters_rows():
    c = QuantizedBatchKVCache([2, 0, 1], group_size=32, bits=8)
    k = mx.array(rng(1).standard_normal((3, 2, 5, 32)).astype(np.float32))
    keys, _ = c.update_and_fetch(k, k)
    assert keys[0].shape == (3, 2, 5, 8) and c._idx == 5
    c.filter([0, 2])  # the row without padding leaves: one column of padding goes
    keys, _ = c.keys_and_values()
    assert c._idx == 4 and c.left_padding.tolist() == [1, 0] and keys[0].shape[:3] == (2, 2, 4)
    np.testing.assert_allclose(
        np.array(mx.dequantize(*keys, group_size=32, bits=8)), np.array(fake_quant(k[mx.array([0, 2]), :, 1:], 32, 8))
    )


@pytest.mark.parametrize("other_quantized", [True, False])
@pytest.mark.parametrize("lengths", [(5, 3), (2, 6), (0, 4), (4, 0)])
def test_quantized_batch_cache_takes_new_rows_as_mlx_lm_does(lengths, other_quantized):
    """extend() aligns both sides as mlx-lm's float BatchKVCache.extend does (same padding, offsets and
    columns), holding what a quantize of those columns holds; a float side is quantized on the way in."""
    from mlx_lm.models.cache import BatchKVCache

    def filled(padding, n, seed, quantized):
        c = QuantizedBatchKVCache(padding, 32, 8) if quantized else BatchKVCache(padding)
        if n:
            k = mx.array(rng(seed).standard_normal((len(padding), 2, n, 32)).astype(np.float32))
            c.update_and_fetch(k, k * 2)
        return c

    (na, nb), pa, pb = lengths, [1, 0], [0]
    want = filled(pa, na, 1, False)
    want.extend(filled(pb, nb, 2, False))
    got = filled(pa, na, 1, True)
    got.extend(filled(pb, nb, 2, other_quantized))
    assert got._idx == want._idx and got.left_padding.tolist() == want.left_padding.tolist()
    assert got.offset.tolist() == want.offset.tolist()
    for stored, ref in zip(got.keys_and_values(), want.keys_and_values()):
        deq = np.array(mx.dequantize(*stored, group_size=32, bits=8))
        np.testing.assert_allclose(deq, np.array(fake_quant(ref, 32, 8)), atol=1e-6)
    with pytest.raises(ValueError, match="4-bit"):
        got.extend(QuantizedBatchKVCache([0], 32, 4))


def test_bad_settings_are_refused_before_any_work(wide):
    model, tok = wide
    for kw, field in (
        (dict(kv_bits=7), "kv_bits"),
        (dict(kv_bits=8, kv_group_size=48), "kv_group_size"),
        (dict(kv_bits=8, quantized_kv_start=-1), "quantized_kv_start"),
    ):
        with pytest.raises(ValueError, match=field):
            next(stream_generate(model, tok, PROMPT, 4, **kw))
        with pytest.raises(ValueError, match=field):
            Chat(model, tok, **kw)
    head = model.args.head_dim
    with pytest.raises(ValueError, match=f"does not divide the model's head size {head}"):
        KVQuantization.make(8, 128, 0, model)


# --- chats and files -------------------------------------------------------------------------------
def test_chat_keeps_a_quantized_cache_across_turns_and_files(wide, tmp_path):
    model, tok = wide
    chat = Chat(model, tok, system="S", kv_bits=8, kv_group_size=32)
    chat.send("First question", max_tokens=6)
    assert all(isinstance(c, QuantizedKVCache) for c in chat._cache)
    second = chat.send("Second question", max_tokens=6)
    fresh = Chat(model, tok, messages=chat.messages[:-1], kv_bits=8, kv_group_size=32)
    fresh_second = fresh.regenerate(max_tokens=6)
    assert "".join(r.text for r in fresh_second) == second
    assert second.stats.prompt_tokens < fresh.last_reply.stats.prompt_tokens

    chat.save(tmp_path / "c.json", include_cache=True)
    again = Chat.load(tmp_path / "c.json", model, tok)
    assert again.kv_settings == {"kv_bits": 8, "kv_group_size": 32, "quantized_kv_start": 0}
    assert all(isinstance(c, QuantizedKVCache) for c in again._cache)
    a, b = again.send("Third", max_tokens=6), chat.send("Third", max_tokens=6)
    assert a == b and a.stats.prompt_tokens == b.stats.prompt_tokens

    assert chat.set_kv_quantization(None) and chat._cache is None  # a float cache is built anew
    assert not chat.set_kv_quantization(None)
    chat.send("Fourth", max_tokens=4)
    assert all(isinstance(c, KVCache) and not hasattr(c, "bits") for c in chat._cache)


def test_quantized_dca_prompt_cache_round_trip(wide, tmp_path):
    model, tok = wide
    dca = dca_twin(model)
    cache = make_prompt_cache(dca)
    prompt = mx.array(tok.encode(PROMPT * 2, add_special_tokens=False), dtype=mx.uint32)
    first = [t for t, _ in generate_step(prompt, dca, max_tokens=4, prompt_cache=cache, kv_bits=4, kv_group_size=32)]
    save_prompt_cache(tmp_path / "p.safetensors", cache, model=dca)
    loaded = load_prompt_cache(tmp_path / "p.safetensors", model=dca)
    assert [type(c) for c in loaded] == [QuantizedDCAKVCache] * len(cache)
    assert [(c.bits, c.group_size, c.offset, c.dca_settings) for c in loaded] == [
        (4, 32, c.offset, (24, 6, 40)) for c in cache
    ]
    nxt = mx.array([first[-1]], dtype=mx.uint32)
    a = next(generate_step(nxt, dca, max_tokens=1, prompt_cache=cache, kv_bits=4, kv_group_size=32))[1]
    b = next(generate_step(nxt, dca, max_tokens=1, prompt_cache=loaded, kv_bits=4, kv_group_size=32))[1]
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6)
    with pytest.raises(Exception, match="differently configured"):
        load_prompt_cache(tmp_path / "p.safetensors", model=dca_twin(model, chunk_size=32))


def test_bytes_per_token(wide):
    """What a token costs in each layer's cache: 8 bits with groups of 32 take 1 + 2*4/32 bytes an
    element against 4 in float32 (scales and biases are in the model's dtype)."""
    model, tok = wide
    sizes = {}
    for bits in (None, 8, 4):
        cache = make_prompt_cache(model)
        list(generate_step(mx.array(list(range(1, 257)), dtype=mx.uint32), model, max_tokens=1,
                           prompt_cache=cache, kv_bits=bits, kv_group_size=32))  # fmt: skip
        sizes[bits] = sum(c.nbytes for c in cache) / cache[0].offset
    elements = 2 * model.args.num_hidden_layers * model.args.num_key_value_heads * model.args.head_dim
    assert sizes[None] >= elements * 4
    assert sizes[8] == pytest.approx(sizes[None] * (1 + 8 / 32) / 4, rel=0.05)
    assert sizes[4] == pytest.approx(sizes[None] * (0.5 + 8 / 32) / 4, rel=0.05)


# --- the benchmark ----------------------------------------------------------------------------------
def test_bench_kv_prints_and_writes_its_figures(tmp_path, capsys, reads):
    import json

    from tiny import DENSE, make_checkpoint

    from qwen2_mlx.bench.kv import main

    if reads != "dequantized reads":
        pytest.skip("the benchmark runs as the machine does")
    path, _ = make_checkpoint(tmp_path / "tiny", DENSE, hidden_size=128)
    out_file = tmp_path / "kv.json"
    args = ["--model", str(path), "--lengths", "600", "--bits", "8,4", "--group-size", "32"]
    assert main([*args, "--dca-chunk-size", "64", "--dca-local-size", "8", "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "8-bit" in out and "4-bit" in out and " dca " in out
    rows = json.loads(out_file.read_text())
    assert [(r["mode"], r["kv_bits"]) for r in rows] == [(m, b) for m in ("plain", "dca") for b in (None, 8, 4)]
    per_token = {(r["mode"], r["kv_bits"]): r["kv_bytes_per_token"] for r in rows}
    elements = 2 * 2 * 2 * 32  # K and V, 2 layers, 2 KV heads, head size 32
    for mode in ("plain", "dca"):
        assert per_token[(mode, None)] == elements * 4
        assert per_token[(mode, 8)] == elements * (1 + 8 / 32)
        assert per_token[(mode, 4)] == elements * (0.5 + 8 / 32)
    assert all(r["max_logit_deviation"] > 0 and r["kl"] > -1e-6 for r in rows if r["kv_bits"])
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert main([*args, "--lengths", "100"]) == 2
    assert "too short" in capsys.readouterr().err


def test_the_read_path_rule_per_device(reads):
    """CPU: dequantize unless the flag asks for MLX's kernels; CUDA: always dequantize (its quantized matmul
    refuses the cache's views: kv_cache.dequantize_reads); Metal: read as stored."""
    from qwen2_mlx.models.kv_cache import dequantize_reads, reads_dequantized

    assert dequantize_reads(on_cpu=True, on_cuda=False) is True
    assert dequantize_reads(on_cpu=True, on_cuda=False, quantized_reads_on_cpu=True) is False
    assert dequantize_reads(on_cpu=False, on_cuda=True) is True
    assert dequantize_reads(on_cpu=False, on_cuda=True, quantized_reads_on_cpu=True) is True  # a CPU-only switch
    assert dequantize_reads(on_cpu=False, on_cuda=False) is False  # Metal
    on_cpu = mx.default_device() == mx.cpu
    expected = (reads == "dequantized reads") if on_cpu else mx.cuda.is_available()
    assert reads_dequantized() is expected
