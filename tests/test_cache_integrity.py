"""Damaged KV-cache files never give a wrong reply (issue 22's cases 6-9 and a full disk).

Each case damages a saved cache the way a failing disk or a careless hand would, then loads it
through `CacheStore`, `Chat.load` or the chat app's backend: the cache is ignored with its reason
and the reply equals a cold one. A second helper re-seals a damaged file (writes the checksum its
new bytes have) to show the layer-by-layer checks catch the same damage on their own.
"""

from __future__ import annotations

import errno
import json
import stat
import struct

import pytest
from api_support import tiny_model
from tui_helpers import backend_reply, model_backend

from qwen2_mlx import CacheIgnored, CacheStore, Chat, PromptCacheError
from qwen2_mlx.generation import cache_integrity
from qwen2_mlx.generation.cache_store import chat_cache_validity
from qwen2_mlx.generation.prompt_cache import load_prompt_cache, save_prompt_cache

GREEDY = {"temperature": 0.0, "max_tokens": 6}


@pytest.fixture(scope="module")
def mtp(tmp_path_factory):
    return tiny_model(tmp_path_factory)


def chatted(model, tok):
    chat = Chat(model, tok, system="Be brief.", **GREEDY)
    chat.send("Hello there, how are you today?")
    return chat


@pytest.fixture
def stored(mtp, tmp_path):
    model, tok, path = mtp
    chat = chatted(model, tok)
    store = CacheStore(tmp_path / "caches")
    cache, tokens = chat.export_cache()
    validity = chat_cache_validity(chat, path)
    assert store.save("c", cache, tokens, validity, model=model).written
    return store, validity, chat, store.path("c")


def read(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write(path, header, payload):
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + payload)


def reseal(path):
    """Give a damaged file the checksum of its current bytes, as if it had been written that way."""
    header, payload = read(path)
    key = next(k for k in header["__metadata__"] if k.endswith(cache_integrity.CHECKSUM_KEY))
    algorithm = header["__metadata__"][key].partition(":")[0]
    header["__metadata__"][key] = cache_integrity.placeholder(algorithm)
    write(path, header, payload)
    data = path.read_bytes()
    h = cache_integrity._new_hasher(algorithm)
    h.update(data)
    header["__metadata__"][key] = f"{algorithm}:{h.hexdigest()}"
    write(path, header, payload)
    assert cache_integrity.verify_file(path) is None


def cold_and_warm(store, validity, chat, mtp):
    """(the reply of a chat that loaded whatever the store gave, the reply of a cold chat, the load)."""
    model, tok, _ = mtp
    warm = Chat(model, tok, messages=chat.messages, **GREEDY)
    loaded = store.load("c", validity, model)
    if loaded.ok:
        warm.adopt_cache(loaded.cache, loaded.tokens)
    cold = Chat(model, tok, messages=chat.messages, **GREEDY)
    return warm.send("And then?"), cold.send("And then?"), loaded


def offset_of(header, layer):
    """Where layer `layer`'s stored offset (an int32 scalar) sits in the payload."""
    return header[f"{layer}.2"]["data_offsets"][0]


# 6 ------------------------------------------------------------------------------------------------
def test_6_changed_tensor_bytes_are_caught_by_the_checksum(stored, mtp):
    store, validity, chat, file = stored
    header, payload = read(file)
    start = header["1.0"]["data_offsets"][0] + 100  # inside layer 1's keys
    damaged = bytearray(payload)
    damaged[start : start + 4] = bytes(b ^ 0xFF for b in damaged[start : start + 4])
    write(file, header, bytes(damaged))
    warm, cold, loaded = cold_and_warm(store, validity, chat, mtp)
    assert not loaded.ok and loaded.status == "corrupt" and "checksum" in loaded.reason
    assert warm == cold


# 7 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("delta", [-5, +300])
def test_7_a_layers_changed_offset_is_refused(stored, mtp, delta):
    store, validity, chat, file = stored
    header, payload = read(file)
    at = offset_of(header, 1)  # layer 1: only layer 0's offset used to be compared
    (held,) = struct.unpack("<i", payload[at : at + 4])
    write(file, header, payload[:at] + struct.pack("<i", held + delta) + payload[at + 4 :])
    warm, cold, loaded = cold_and_warm(store, validity, chat, mtp)
    assert not loaded.ok and "checksum" in loaded.reason and warm == cold
    reseal(file)  # the layer check catches it without the checksum's help
    warm, cold, loaded = cold_and_warm(store, validity, chat, mtp)
    assert not loaded.ok and "layer 1 holds" in loaded.reason and warm == cold


# 8 ------------------------------------------------------------------------------------------------
def test_8_a_changed_dtype_or_swapped_keys_and_values_are_refused(stored, mtp):
    store, validity, chat, file = stored
    original = file.read_bytes()
    header, payload = read(file)
    header["0.0"]["dtype"] = "I32"  # same size as F32: the file still parses
    write(file, header, payload)
    warm, cold, loaded = cold_and_warm(store, validity, chat, mtp)
    assert not loaded.ok and "checksum" in loaded.reason and warm == cold
    reseal(file)
    warm, cold, loaded = cold_and_warm(store, validity, chat, mtp)
    assert not loaded.ok and "layer 0 keys: int32" in loaded.reason and warm == cold

    file.write_bytes(original)
    header, payload = read(file)
    keys, values = header["0.0"], header["0.1"]
    keys["data_offsets"], values["data_offsets"] = values["data_offsets"], keys["data_offsets"]
    write(file, header, payload)
    warm, cold, loaded = cold_and_warm(store, validity, chat, mtp)
    assert not loaded.ok and "checksum" in loaded.reason and warm == cold


# 9 ------------------------------------------------------------------------------------------------
def test_9_files_are_private_saves_never_raise_and_reasons_are_right(stored, mtp, tmp_path):
    store, validity, chat, file = stored
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    model, tok, path = mtp
    cache, tokens = chat.export_cache()
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    saved = CacheStore(blocked / "caches").save("c", cache, tokens, validity, model=model)
    assert not saved.written and saved.reason.startswith("not saved: ") and "a-file" in saved.reason
    saved = store.save("c", cache, tokens[:-1], validity, model=model)
    assert not saved.written and saved.reason.startswith("not saved: ")
    other = store.load("c", {**validity, "model": "/models/another", "weights": "f00d"}, model)
    assert other.status == "mismatch" and "made for another model" in other.reason
    assert "weights" not in other.reason
    stale = store.load("c", {**validity, "weights": "f00d"}, model)
    assert stale.status == "stale" and "weights changed" in stale.reason


def test_a_full_disk_keeps_the_previous_file_and_says_so(stored, mtp, monkeypatch):
    store, validity, chat, file = stored
    model, tok, _ = mtp
    before = file.read_bytes()
    longer = Chat(model, tok, messages=chat.messages, **GREEDY)
    longer.send("One more turn, please.")
    cache, tokens = longer.export_cache()
    written, real = [], cache_integrity.ChecksumWriter.write

    def full(self, data):  # the disk fills up 4 KB into the new file
        written.append(len(data))
        if sum(written) > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data)

    monkeypatch.setattr(cache_integrity.ChecksumWriter, "write", full)
    saved = store.save("c", cache, tokens, validity, model=model)
    monkeypatch.undo()
    assert not saved.written and "disk is full" in saved.reason and "previous cache" in saved.reason
    assert file.read_bytes() == before and not list(store.root.glob(".*tmp*"))
    assert store.load("c", validity, model).ok


# Chat.save / load_prompt_cache -------------------------------------------------------------------
def test_chat_files_prove_their_cache_and_its_tokens(mtp, tmp_path):
    model, tok, _ = mtp
    chat = chatted(model, tok)
    chat.save(tmp_path / "a.json", include_cache=True)
    kv = tmp_path / "a.kv.safetensors"
    assert stat.S_IMODE(kv.stat().st_mode) == 0o600
    assert Chat.load(tmp_path / "a.json", model, tok).send("More?") == chat.send("More?")
    # a cache file of the same length made for other tokens (another chat's) in its place: refused
    others = list(chat._cache_tokens)
    others[-3] = (others[-3] + 1) % 512
    loaded = Chat.load(tmp_path / "a.json", model, tok)
    save_prompt_cache(kv, loaded._cache, model=model, tokens=others)
    with pytest.warns(CacheIgnored, match="other tokens"):
        refused = Chat.load(tmp_path / "a.json", model, tok)
    assert refused._cache is None and refused.messages == chat.messages[:-2]
    header, payload = read(kv)
    write(kv, header, payload[:-8] + b"\x00" * 8)
    with pytest.warns(CacheIgnored, match="checksum"):
        damaged = Chat.load(tmp_path / "a.json", model, tok)
    # the damaged cache is never used: the reply is the cold one, read from the messages again
    assert damaged._cache is None and damaged.send("More?") == refused.send("More?")


def test_load_prompt_cache_checks_what_it_can(mtp, tmp_path):
    import mlx_lm.models.cache as mlx_cache

    model, tok, _ = mtp
    chat = chatted(model, tok)
    theirs = tmp_path / "mlx.safetensors"
    mlx_cache.save_prompt_cache(str(theirs), chat._cache)  # no checksum: loads, unless one is required
    assert load_prompt_cache(theirs, model=model)[0].offset == len(chat._cache_tokens)
    with pytest.raises(PromptCacheError, match="no checksum"):
        load_prompt_cache(theirs, model=model, require_checksum=True)
    ours = tmp_path / "ours.safetensors"
    save_prompt_cache(ours, chat._cache, model=model, tokens=chat._cache_tokens)
    with pytest.raises(PromptCacheError, match="other tokens"):
        load_prompt_cache(ours, model=model, tokens=chat._cache_tokens[:-1] + [0])


# the chat app's backend ----------------------------------------------------------------------------
def test_the_apps_backend_ignores_a_damaged_cache_and_answers_as_a_cold_one(mtp, tmp_path):
    from tui.backend import DEFAULT_SETTINGS

    settings, root = {**DEFAULT_SETTINGS, **GREEDY}, tmp_path / "caches"
    first = model_backend(mtp[2], cache_root=root)
    first.open_chat("k")
    turn1 = [{"role": "user", "content": "Tell me about the sea."}]
    a = backend_reply(first, turn1, settings)
    assert first.persist() is None
    file = root / "k.safetensors"
    header, payload = read(file)
    start = header["0.1"]["data_offsets"][0] + 8
    write(file, header, payload[:start] + bytes(8) + payload[start + 8 :])  # values of layer 0 zeroed

    reopened = model_backend(mtp[2], cache_root=root)
    note, warning = reopened.open_chat("k", True)
    assert warning and note.startswith("chat cache ignored: the file is damaged") and "checksum" in note
    turn2 = turn1 + [{"role": "assistant", "content": a}, {"role": "user", "content": "And the sky?"}]
    cold = model_backend(mtp[2], cache_budget=0)
    assert backend_reply(reopened, turn2, settings) == backend_reply(cold, turn2, settings)


@pytest.mark.parametrize("algorithm", ["xxh3-128", "blake2b-128"])
def test_both_checksums_round_trip_and_catch_one_flipped_bit(mtp, tmp_path, monkeypatch, algorithm):
    if algorithm == "xxh3-128":
        pytest.importorskip("xxhash")
    monkeypatch.setattr(cache_integrity, "default_algorithm", lambda: algorithm)
    model, tok, _ = mtp
    chat = chatted(model, tok)
    path = tmp_path / "c.safetensors"
    save_prompt_cache(path, chat._cache, model=model)
    assert cache_integrity.verify_file(path) is None and algorithm in path.read_bytes()[:4096].decode("latin-1")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert "checksum does not match" in cache_integrity.verify_file(path)
