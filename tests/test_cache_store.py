"""CacheStore (generation/cache_store.py): per-chat KV caches on disk, their validity, the budget,
and Chat's adopt/export: a reopened chat answers as a cold one while prefilling only the suffix."""

from __future__ import annotations

import json
import os
import struct

import mlx.core as mx
import pytest
from api_support import tiny_model

from qwen2_mlx import CacheStore, Chat
from qwen2_mlx.generation.cache_store import (
    TOKENS_KEY,
    VALIDITY_KEY,
    cache_validity,
    chat_cache_validity,
    format_size,
    parse_size,
)
from qwen2_mlx.generation.prompt_cache import cache_nbytes, save_prompt_cache

GREEDY = {"temperature": 0.0, "max_tokens": 6}


@pytest.fixture(scope="module")
def mtp(tmp_path_factory):
    return tiny_model(tmp_path_factory)


def chatted(model, tok, turns=("Hello there, how are you today?", "Tell me more.")):
    chat = Chat(model, tok, system="Be brief.", **GREEDY)
    for t in turns:
        chat.send(t)
    return chat


def test_reopened_chat_answers_like_a_cold_one_and_prefills_only_the_suffix(mtp, tmp_path):
    model, tok, path = mtp
    chat = chatted(model, tok)
    store = CacheStore(tmp_path / "caches")
    cache, tokens = chat.export_cache()
    saved = store.save("chat-1", cache, tokens, chat_cache_validity(chat, path), model=model)
    assert saved.written and saved.nbytes > cache_nbytes(cache) and not saved.evicted

    # "restart": a new Chat with the same history, the cache from disk, vs a cold one
    warm = Chat(model, tok, messages=chat.messages, **GREEDY)
    loaded = store.load("chat-1", chat_cache_validity(warm, path), model=model)
    assert loaded.ok and loaded.status == "loaded" and loaded.tokens == tokens
    warm.adopt_cache(loaded.cache, loaded.tokens)
    cold = Chat(model, tok, messages=chat.messages, **GREEDY)
    a, b = warm.send("And then?"), cold.send("And then?")
    assert a == b
    assert warm.last_cached_tokens == len(tokens) and cold.last_cached_tokens == 0
    assert a.stats.prompt_tokens < b.stats.prompt_tokens // 2  # only the new message was read
    # regenerate and an edit after the reopen still agree with the cold chat
    assert warm.send("Again?") == cold.send("Again?")
    warm.edit(3, "Edited question?"), cold.edit(3, "Edited question?")
    assert list(warm.regenerate()) and list(cold.regenerate())
    assert warm.messages == cold.messages


def test_a_cache_saved_before_long_context_was_on_by_default_is_read_again(mtp, tmp_path):
    """Saved by a plain-attention model (the old default, `long_context="off"` now): the default DCA model
    ignores it with a line saying why, and the chat reads the conversation again, as a cold one does."""
    from qwen2_mlx import load

    model, tok, path = mtp
    old, _ = load(path, long_context="off")
    chat = chatted(old, tok)
    store = CacheStore(tmp_path / "caches")
    store.save("c", *chat.export_cache(), chat_cache_validity(chat, path), model=old)
    now = Chat(model, tok, messages=chat.messages, **GREEDY)
    loaded = store.load("c", chat_cache_validity(now, path), model=model)
    assert not loaded.ok and loaded.status == "mismatch"
    assert (
        loaded.reason == "it was made with plain attention and the model now runs DCA chunk 4096, local 512: read again"
    )
    assert store.load("c", chat_cache_validity(Chat(old, tok), path), model=old).ok  # still right for its settings


def test_adopt_refuses_a_cache_that_does_not_fit(mtp):
    model, tok, _ = mtp
    chat = chatted(model, tok, turns=("Hi",))
    cache, tokens = chat.export_cache()
    other = Chat(model, tok)
    with pytest.raises(ValueError, match="does not fit"):
        other.adopt_cache(cache, tokens[:-1])
    with pytest.raises(ValueError, match="does not fit"):
        other.adopt_cache(cache[:1], tokens)
    chat.clear_cache()
    assert chat.export_cache() == (None, []) and chat.send("Again") is not None


@pytest.fixture
def saved(mtp, tmp_path):
    model, tok, path = mtp
    chat = chatted(model, tok, turns=("Hi there",))
    store = CacheStore(tmp_path / "caches")
    cache, tokens = chat.export_cache()
    validity = chat_cache_validity(chat, path)
    assert store.save("c", cache, tokens, validity, model=model).written
    return store, validity, model, store.path("c")


def test_missing_truncated_and_corrupt_files_are_ignored_with_a_reason(saved):
    store, validity, model, file = saved
    missing = store.load("nope", validity, model)
    assert not missing.ok and missing.status == "missing" and missing.reason
    data = file.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 20, 4):
        file.write_bytes(data[:cut])
        r = store.load("c", validity, model)
        assert not r.ok and r.status == "truncated", (cut, r)
        assert "truncated" in r.reason
    file.write_bytes(b"\x00" * len(data))
    r = store.load("c", validity, model)
    assert not r.ok and r.status == "corrupt"
    file.write_bytes(data[:8] + b"x" + data[9:])  # the header is no longer JSON
    assert store.load("c", validity, model).status == "corrupt"
    # token ids that disagree with what the cache holds: refused, never a wrong reply
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    tokens = json.loads(header["__metadata__"]["0." + TOKENS_KEY])
    header["__metadata__"]["0." + TOKENS_KEY] = json.dumps(tokens + [1])
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    file.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n :])
    r = store.load("c", validity, model)
    assert not r.ok and r.status == "corrupt" and "lists" in r.reason


def test_other_settings_and_changed_weights_are_refused(saved, mtp, tmp_path):
    store, validity, model, file = saved
    for change, status, words in (
        ({"kv_bits": 4, "kv_group_size": 64, "quantized_kv_start": 0}, "mismatch", "kv_bits off in the file, 4 now"),
        ({"dtype": "float16"}, "mismatch", "dtype float32 in the file, float16 now"),
        ({"rope_theta": 1.0}, "mismatch", "rope_theta"),
        ({"model": "/elsewhere"}, "mismatch", "model"),
        ({"weights": "0123"}, "stale", "weights changed"),
    ):
        r = store.load("c", {**validity, **change}, model)
        assert not r.ok and r.status == status and words in r.reason, (change, r.reason)
    # a quantized-cache setting is part of the key from the start
    assert cache_validity(model, kv_bits=8, kv_group_size=32)["kv_group_size"] == 32
    assert cache_validity(model, kv_group_size=32)["kv_group_size"] is None
    # touching the weights makes the fingerprint (and so the stored cache) stale
    _, _, path = mtp
    weights = next(path.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        r = store.load("c", cache_validity(model, path), model)
        assert r.status == "stale"
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.load("c", validity, model).ok


def test_the_budget_evicts_least_recently_used_and_skips_oversized(mtp, tmp_path):
    model, tok, path = mtp
    chat = chatted(model, tok, turns=("Hi there",))
    cache, tokens = chat.export_cache()
    validity = chat_cache_validity(chat, path)
    size = cache_nbytes(cache) + 4096  # a file: the arrays and a header
    store = CacheStore(tmp_path / "caches", budget=3 * size)
    for i, key in enumerate(("a", "b", "c")):
        assert store.save(key, cache, tokens, validity, model).written
        os.utime(store.path(key), (1000 + i, 1000 + i))
    assert store.load("a", validity, model).ok  # "a" is now the most recently used
    d = store.save("d", cache, tokens, validity, model)
    assert d.written and d.evicted == ["b"]
    assert [k for k, _, _ in store.entries()][-1] == "d" and store.usage() <= store.budget
    assert sorted(store.set_budget(size)) == ["a", "c"]  # the newest one stays
    assert [k for k, _, _ in store.entries()] == ["d"]
    tiny = CacheStore(tmp_path / "caches", budget=size // 2)
    big = tiny.save("e", cache, tokens, validity, model)
    assert not big.written and "over the" in big.reason and not tiny.path("e").exists()
    with pytest.raises(ValueError, match="cache key"):
        store.path("../x")


def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    root = tmp_path / "caches"
    root.mkdir()
    dead = root / ".x.safetensors.999999999.tmp.safetensors"
    live = root / f".y.safetensors.{os.getpid()}.tmp.safetensors"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    store = CacheStore(root)
    assert not dead.exists() and live.exists() and store.entries() == []


def test_saving_streams_one_array_at_a_time(tmp_path):
    # A cache whose layers keep spare room: the saved slices must not all exist in memory at once.
    from mlx_lm.models.cache import KVCache

    cache = []
    for _ in range(8):
        c = KVCache()
        c.update_and_fetch(mx.ones((1, 2, 3000, 64)), mx.ones((1, 2, 3000, 64)))
        c.offset = 2900
        cache.append(c)
    mx.eval([c.keys for c in cache] + [c.values for c in cache])
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    save_prompt_cache(tmp_path / "big.safetensors", cache, metadata={"k": "v"})
    extra = mx.get_peak_memory() - before
    one_layer = 2 * 3000 * 64 * 4
    assert extra < 3 * one_layer, (extra, cache_nbytes(cache))  # all slices at once would be ~16 layers


def test_sizes_parse_and_print():
    assert parse_size("4GB") == 4_000_000_000 and parse_size("500 mb") == 500_000_000
    assert parse_size("1.5g") == 1_500_000_000 and parse_size("off") == 0 and parse_size("0") == 0
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
    assert format_size(4_000_000_000) == "4GB" and format_size(1_500_000_000) == "1.5GB" and format_size(0) == "off"


def test_validity_is_read_back_as_saved(saved):
    store, validity, _, file = saved
    n = struct.unpack("<Q", file.read_bytes()[:8])[0]
    meta = json.loads(file.read_bytes()[8 : 8 + n])["__metadata__"]
    assert json.loads(meta["0." + VALIDITY_KEY]) == validity and validity["dtype"] == "float32"


def test_reopen_benchmark_runs_and_compares_first_tokens(mtp, capsys):
    from qwen2_mlx.bench.reopen import main

    _, _, path = mtp
    assert main(["--model", str(path), "--tokens", "200", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "reopened / cold:" in out and "same first token:       yes" in out
    cold = float(out.split("TTFT cold (median):")[1].split("s")[0])
    assert cold > 0
    with pytest.raises(SystemExit):
        main(["--model", str(path), "--tokens", "10"])
