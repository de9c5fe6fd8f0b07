"""Speculative decoding in Chat (tiny models) and greedy equality on the real model."""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest
from api_support import real_model_or_skip, tiny_model
from test_chat import assert_cache_consistent

from qwen2_mlx import Chat, stream_generate
from qwen2_mlx.generation.prompt_cache import make_prompt_cache


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    model, _, _ = tiny_model(tmp_path_factory, seed=1)
    return model


def assert_cache_is_plain(chat):
    """Keys and values equal those of plain one-token-at-a-time decoding of the cached tokens."""
    assert_cache_consistent(chat)
    caches = [(chat.model, chat._cache, len(chat._cache_tokens))]
    if chat._draft_cache is not None:
        caches.append((chat._draft_of, chat._draft_cache, chat._draft_cache[0].offset))
        assert chat._draft_cache[0].offset <= len(chat._cache_tokens)
    for model, cache, n in caches:
        assert cache[0].offset == n
        ref = make_prompt_cache(model)
        for t in chat._cache_tokens[:n]:
            model(mx.array([[t]], dtype=mx.uint32), cache=ref)
        for c, r in zip(cache, ref):
            assert mx.allclose(c.keys[..., :n, :], r.keys[..., :n, :], atol=1e-4).item()
            assert mx.allclose(c.values[..., :n, :], r.values[..., :n, :], atol=1e-4).item()


def conversation(chat, stop=None):
    """Three turns with a regenerate and an edit; the replies and the stats of each."""
    out = [chat.send("Hello, how are you?", max_tokens=20)]
    out.append(chat.send("The quick brown fox jumps over the lazy dog.", max_tokens=24, stop=stop))
    out.append(chat._collect(chat.regenerate(max_tokens=16)))
    chat.edit(2, "I am fine, thank you.")
    out.append(chat._collect(chat.regenerate(max_tokens=18)))
    out.append(chat.send("你好，世界！", max_tokens=20))
    return out


@pytest.mark.parametrize("method", ["lookup", "draft", "self-draft"])
def test_chat_turns_equal_plain_and_keep_the_cache_in_step(mt, other, method):
    model, tok = mt
    plain = Chat(model, tok)
    expected = conversation(plain)
    spec = {
        "lookup": dict(lookup={"ngram_min": 1}),
        "draft": dict(draft_model=other),
        "self-draft": dict(draft_model=model),
    }
    chat = Chat(model, tok, **spec[method])
    got = conversation(chat)
    assert [str(r) for r in got] == [str(r) for r in expected]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in expected]
    assert chat.messages == plain.messages and chat.branches(3) == plain.branches(3)
    assert all(r.stats.forward_passes > 0 for r in got)
    accepted = sum(r.stats.accepted_tokens for r in got)
    assert accepted > 0 if method != "draft" else sum(r.stats.proposed_tokens for r in got) > accepted
    assert_cache_is_plain(chat)


def test_chat_stop_and_cancel_inside_runs(mt):
    model, tok = mt
    plain, chat = Chat(model, tok), Chat(model, tok, draft_model=model, num_draft_tokens=4)
    first = plain.send("Hello, how are you?", max_tokens=30)
    stop = str(first)[12:15]
    assert chat.send("Hello, how are you?", max_tokens=30, stop=[stop]) == str(first)[: str(first).index(stop)]
    assert_cache_is_plain(chat)
    # Cancel after a proposed token: the partial reply is kept, the cache follows the history.
    cancel, parts = threading.Event(), []
    for r in chat.stream("The quick brown fox", max_tokens=40, cancel=cancel):
        parts.append(r.text)
        if r.from_draft and r.generation_tokens >= 6:
            cancel.set()
    assert r.finish_reason == "cancelled" and chat.last_reply.finish_reason == "cancelled"
    assert_cache_is_plain(chat)
    # The next turn answers as plain decoding does over the same history.
    plain.messages = chat.messages
    assert chat.send("你好", max_tokens=16) == plain.send("你好", max_tokens=16)
    assert_cache_is_plain(chat)
    # Switching the method mid-chat (lookup on, then a different draft) keeps everything exact.
    chat.lookup = True
    assert chat.send("again", max_tokens=12) == plain.send("again", max_tokens=12)
    chat.lookup = None
    assert chat.send("more", max_tokens=12) == plain.send("more", max_tokens=12)
    assert_cache_is_plain(chat)


# --- the real model: greedy text of both methods equals plain decoding ------------------------------
CODE = """def total(items, tax):
    result = 0
    for item in items:
        result = result + item.price * item.count
    return result * (1 + tax)
"""


@pytest.mark.real_model
def test_real_model_both_methods_equal_plain(request):
    model, tok = real_model_or_skip(request)
    msgs = [{"role": "user", "content": "Add type hints to this code. Reply with the code only.\n\n" + CODE}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    plain = list(stream_generate(model, tok, prompt, max_tokens=40))
    want = [r.token for r in plain]
    text = "".join(r.text for r in plain)
    for kw in [dict(lookup=True), dict(draft_model=model, num_draft_tokens=3)]:
        rs = list(stream_generate(model, tok, prompt, max_tokens=40, **kw))
        assert [r.token for r in rs] == want, kw
        assert rs[-1].accepted_tokens > 10
    # A stop string and max_tokens landing inside lookup's accepted runs; a cancellation inside one.
    stop = text[text.index("items") : text.index("items") + 8]
    rs = list(stream_generate(model, tok, prompt, max_tokens=40, stop=[stop], lookup=True))
    assert "".join(r.text for r in rs) == text[: text.index(stop)] and rs[-1].finish_reason == "stop"
    rs = list(stream_generate(model, tok, prompt, max_tokens=23, lookup=True))
    assert [r.token for r in rs] == want[:23] and rs[-1].finish_reason == "length"
    cancel, seen = threading.Event(), []
    for r in stream_generate(model, tok, prompt, max_tokens=40, lookup=True, cancel=cancel):
        seen.append(r.token)
        if r.from_draft and len(seen) >= 12:
            cancel.set()
    assert r.finish_reason == "cancelled" and seen == want[: len(seen)]


@pytest.mark.real_model
def test_real_model_chat_three_turns_with_regenerate(request):
    model, tok = real_model_or_skip(request)

    def turns(chat):
        a = chat.send("Rename the variable `result` to `subtotal` in this code:\n\n" + CODE, max_tokens=30)
        b = chat.send("Now add a docstring.", max_tokens=20)
        c = chat._collect(chat.regenerate(max_tokens=20))
        return [str(a), str(b), str(c)], chat

    want, plain = turns(Chat(model, tok))
    for kw in [dict(lookup=True), dict(draft_model=model, num_draft_tokens=3)]:
        got, chat = turns(Chat(model, tok, **kw))
        assert got == want, kw
        assert chat.messages == plain.messages
        assert_cache_consistent(chat)


def test_saved_chat_gets_a_draft_after_loading(mt, tmp_path):
    model, tok = mt
    plain = Chat(model, tok)
    plain.send("Hello, how are you?", max_tokens=12)
    plain.save(tmp_path / "c.json", include_cache=True)
    chat = Chat.load(tmp_path / "c.json", model, tok)
    chat.draft_model = model  # the draft's cache is built from the cached tokens on the next turn
    assert chat.send("The quick brown fox", max_tokens=16) == plain.send("The quick brown fox", max_tokens=16)
    assert chat.last_reply.stats.accepted_tokens > 0
    assert_cache_is_plain(chat)
