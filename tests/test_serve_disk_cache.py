"""The server's prefix cache on disk (`--cache-dir`): a long prompt survives a restart of a real
`qwen2-serve` process (cached tokens reported, the same reply), and a damaged, stale or foreign
file is never used."""

from __future__ import annotations

import openai
import pytest
from serve_support import ServerProcess
from tiny import DENSE, make_checkpoint

NAME = "tiny-disk"
SYSTEM = "You review code. " + " ".join(f"Rule {i}: keep function {i} short and name it well." for i in range(40))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-disk") / NAME
    make_checkpoint(path, DENSE)
    return path


def ask(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Is this fine?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens


def run_once(tiny_path, tmp_path, cache_dir, *extra):
    server = ServerProcess(tiny_path, "--cache-dir", str(cache_dir), *extra, log=tmp_path / "server.log")
    try:
        return ask(server)
    finally:
        server.stop()


def files(cache_dir):
    return sorted(cache_dir.glob("prefix-*.safetensors"))


def test_a_long_prompt_survives_a_restart_and_a_damaged_file_is_ignored(tiny_path, tmp_path):
    cache_dir = tmp_path / "cache"
    cold, n, cached = run_once(tiny_path, tmp_path, cache_dir)
    assert n >= 256 and cached == 0
    assert len(files(cache_dir)) == 1  # written when the request ended

    warm, n2, cached = run_once(tiny_path, tmp_path, cache_dir)  # a new process: only the disk knows it
    assert (warm, n2) == (cold, n) and cached == n - 1  # all but the last prompt token, which gives the logits

    (path,) = files(cache_dir)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # a crash mid-copy, a full disk
    again, _, cached = run_once(tiny_path, tmp_path, cache_dir)
    assert again == cold and cached == 0  # read from scratch, never from the damaged file
    assert [p.stat().st_size for p in files(cache_dir)] == [len(data)]  # deleted, then written whole again

    off, _, cached = run_once(tiny_path, tmp_path, tmp_path / "unused", "--no-cache-dir")
    assert off == cold and cached == 0 and not (tmp_path / "unused").exists()


def test_the_index_keeps_one_file_per_conversation_and_skips_foreign_and_garbage_files(tiny_path, tmp_path):
    from mlx_lm.models.cache import LRUPromptCache

    from qwen2_mlx import load
    from qwen2_mlx.generation.cache_store import cache_validity
    from qwen2_mlx.generation.generate import prefill_prompt_cache
    from qwen2_mlx.serve.disk_cache import DiskPrefixCache

    model, tok = load(tiny_path)
    ids = [(7 * i) % 500 + 3 for i in range(400)]
    mine = cache_validity(model, tiny_path)
    disk = DiskPrefixCache(tmp_path / "c", mine, model, budget=1 << 30)
    disk.keep(ids[:300], prefill_prompt_cache(model, tok, ids[:300]))
    disk.keep(ids[:100], prefill_prompt_cache(model, tok, ids[:100]))  # under min_tokens: not written
    disk.keep(ids[:280], prefill_prompt_cache(model, tok, ids[:280]))  # covered by the 300-token file
    assert list(disk.index.values()) == [ids[:300]]
    disk.keep(ids, prefill_prompt_cache(model, tok, ids))  # the conversation went on: the shorter file goes
    assert list(disk.index.values()) == [ids] and len(files(tmp_path / "c")) == 1

    (tmp_path / "c" / "prefix-garbage.safetensors").write_bytes(b"\xff" * 64)
    foreign = DiskPrefixCache(tmp_path / "c", {**mine, "dtype": "bfloat16"}, model, budget=1 << 30)
    assert foreign.index == {}  # another model's or settings' files are not ours to use...
    memory = LRUPromptCache()
    assert not foreign.load_into(memory, "m", ids + [1, 2], 0)
    reopened = DiskPrefixCache(tmp_path / "c", mine, model, budget=1 << 30)
    assert list(reopened.index.values()) == [ids]  # ...nor to delete; the garbage file is not indexed
    assert reopened.load_into(memory, "m", ids[:350] + [1, 2], 0)
    cache, rest = memory.fetch_nearest_cache("m", ids[:350] + [1, 2])
    assert rest == [1, 2] and cache[0].offset == 350
    assert not reopened.load_into(memory, "m", ids[:350] + [1, 2], 350)  # memory already has as much
