"""Checkpoints of a long read (generation/checkpoint.py) through `Chat`'s `checkpoint=` setting: a read
cancelled half-way and adopted by a fresh Chat answers like an uninterrupted read, with plain, DCA and
8-bit KV caches; and when the checkpointer writes."""

from __future__ import annotations

import copy
import threading

import pytest
from api_support import tiny_model

from qwen2_mlx import Chat
from qwen2_mlx.generation.cache_store import CacheStore, chat_cache_validity
from qwen2_mlx.generation.checkpoint import Checkpointer

TEXT = " ".join(f"item {i} weighs {i * 37 % 101} grams;" for i in range(120)) + " Which item is heaviest?"


def dca_copy(model):
    from mlx.utils import tree_flatten

    from qwen2_mlx.models.config import DCAConfig
    from qwen2_mlx.models.model import Model

    args = copy.deepcopy(model.args)
    args.dual_chunk_attention_config = DCAConfig(chunk_size=256, local_size=32)
    dca = Model(args)
    dca.load_weights(list(tree_flatten(model.parameters())))
    return dca


@pytest.mark.parametrize("kind", ["plain", "dca", "kv8"])
def test_a_read_cancelled_half_way_resumes_from_its_checkpoint(tmp_path_factory, tmp_path, kind):
    # kv8: heads of 32 (hidden 128), so a quantization group of 32 fits
    model, tok, path = tiny_model(tmp_path_factory, **({"hidden_size": 128} if kind == "kv8" else {}))
    if kind == "dca":  # chunks of 256 tokens: the prompt crosses several, the checkpoint lands inside one
        model = dca_copy(model)
    kv = {"kv_bits": 8, "kv_group_size": 32} if kind == "kv8" else {}
    reader = Chat(model, tok, **kv)
    store = CacheStore(tmp_path)
    point = Checkpointer(store, "c", chat_cache_validity(reader, path), model, every_seconds=1e9, every_tokens=100)
    stop = threading.Event()

    def progress(done, total):
        if done >= total // 2:
            stop.set()  # as Esc does: the read ends at the next step

    cut = reader.send(TEXT, cancel=stop, checkpoint=point, prefill_step_size=64, prompt_progress_callback=progress)
    assert cut.finish_reason == "cancelled" and point.writes >= 2
    loaded = store.load("c", chat_cache_validity(Chat(model, tok, **kv), path), model)
    assert loaded.ok, loaded.reason
    total = len(reader._tokens([{"role": "user", "content": TEXT}], True))
    assert total // 3 < len(loaded.tokens) < total

    resumed = Chat(model, tok, **kv)
    resumed.adopt_cache(loaded.cache, loaded.tokens)
    again = resumed.send(TEXT, max_tokens=8, temperature=0.0, prefill_step_size=64)
    whole = Chat(model, tok, **kv).send(TEXT, max_tokens=8, temperature=0.0, prefill_step_size=64)
    assert again == whole and again.stats.prompt_tokens == total - len(loaded.tokens)


def test_the_checkpointer_writes_when_due_and_backs_off_on_a_slow_disk(tmp_path_factory, tmp_path):
    model, tok, path = tiny_model(tmp_path_factory)
    from qwen2_mlx.generation.generate import prefill_prompt_cache

    ids = [(5 * i) % 400 + 3 for i in range(300)]
    now = [0.0]
    store = CacheStore(tmp_path)
    slow = store.save

    def save(*a, **k):  # every write takes 3 s of the clock
        now[0] += 3.0
        return slow(*a, **k)

    store.save = save
    point = Checkpointer(store, "k", {"v": 1}, model, every_seconds=10.0, clock=lambda: now[0])
    cache = prefill_prompt_cache(model, tok, ids[:100])
    assert not point(cache, ids[:100])  # nothing is due before 10 s of reading
    now[0] = 10.0
    assert point(cache, ids[:100]) and point.saved == 100 and store.peek("k")[1] == ids[:100]
    assert not point(cache, ids[:100])  # nothing new to write
    cache = prefill_prompt_cache(model, tok, ids[100:200], cache)
    now[0] = 24.0  # 11 s after the write ended: due at 10 s, but a 3 s write waits 30 s (a tenth of the time)
    assert not point(cache, ids[:200])
    now[0] = 43.5
    assert point(cache, ids[:200]) and point.writes == 2
    store.budget = 0  # caches on disk off: no checkpoints
    now[0] = 1000.0
    cache = prefill_prompt_cache(model, tok, ids[200:], cache)
    assert not point(cache, ids)
