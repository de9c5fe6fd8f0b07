"""Chat: history and branches, KV prefix reuse, context policies, cancellation, save/load."""

from __future__ import annotations

import json
import threading

import pytest
from api_support import real_model_or_skip, scripted

from qwen2_mlx import CacheIgnored, Chat, ChatFileError, ContextOverflowError, Reply
from qwen2_mlx.generation.chat import _common_prefix


def say(tok, text):
    """A scripted sampler that replies `text` and then ends the turn."""
    return scripted(tok.encode(text, add_special_tokens=False) + [next(iter(tok.eos_token_ids))])


def render(chat, messages, generation_prompt):
    return chat._tokens(messages, generation_prompt)


def assert_cache_consistent(chat):
    """The KV cache holds exactly `_cache_tokens`, a prefix of the rendered history."""
    assert chat._cache[0].offset == len(chat._cache_tokens)
    history = render(chat, chat.messages, False)
    assert history[: len(chat._cache_tokens)] == chat._cache_tokens


def test_messages_system_and_replies(mt):
    model, tok = mt
    chat = Chat(model, tok, system="Be brief.")
    reply = chat.send("Hello, how are you?", sampler=say(tok, "Fine, thank you."))
    assert isinstance(reply, Reply) and reply == "Fine, thank you." and reply.finish_reason == "stop"
    assert chat.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "Fine, thank you."},
    ]
    assert chat.last_reply == reply and chat.last_reply.finish_reason == "stop"
    chat.system = None
    assert chat.messages[0]["role"] == "user"
    seeded = Chat(
        model,
        tok,
        messages=[
            {"role": "system", "content": "S"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ],
    )
    assert seeded.system == "S" and [m["role"] for m in seeded.messages] == ["system", "user", "assistant"]
    with pytest.raises(ValueError, match="role"):
        Chat(model, tok, messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(TypeError, match="tempreature"):
        Chat(model, tok, tempreature=0.5)
    with pytest.raises(ValueError, match="context_policy"):
        Chat(model, tok, context_policy="truncate")


def test_follow_up_prefills_only_the_new_tokens(mt):
    model, tok = mt
    chat = Chat(model, tok, system="Be brief.")
    first = chat.send("Hello, how are you?", sampler=say(tok, "Fine, thank you."))
    full_first = render(chat, chat.messages[:2], True)
    assert first.stats.prompt_tokens == len(full_first)
    cached = list(chat._cache_tokens)
    assert_cache_consistent(chat)
    second = chat.send("And the fox?", sampler=say(tok, "It jumps."))
    full_second = render(chat, chat.messages[:4], True)
    assert second.stats.prompt_tokens == len(full_second) - len(cached)
    assert second.stats.prompt_tokens < len(full_second) // 2
    # the cache held the whole first exchange, reply and end-of-turn token included
    assert len(cached) == len(render(chat, chat.messages[:3], False)) - 1
    assert_cache_consistent(chat)


def test_regenerate_keeps_the_old_reply_as_a_branch(mt):
    model, tok = mt
    chat = Chat(model, tok)
    chat.send("Hello", sampler=say(tok, "Hi there."))
    responses = list(chat.regenerate(sampler=say(tok, "Good day.")))
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].prompt_tokens == 1  # everything up to the reply was still cached
    assert chat.messages[-1]["content"] == "Good day."
    assert chat.branches(1) == ["Hi there.", "Good day."] and chat.active_branch(1) == 1
    chat.switch_branch(1, 0)
    assert chat.messages[-1]["content"] == "Hi there."
    before = list(chat._cache_tokens)  # still holds the "Good day." branch
    follow = chat.send("Thanks", sampler=say(tok, "You are welcome."))
    # the cache was trimmed back to the common prefix of both branches, not rebuilt
    ids = render(chat, chat.messages[:3], True)
    assert 0 < _common_prefix(before, ids) < len(before)
    assert follow.stats.prompt_tokens == len(ids) - _common_prefix(before, ids)
    assert_cache_consistent(chat)
    chat.switch_branch(1, 1)
    assert chat.messages[-1]["content"] == "Good day."  # the other branch has no follow-up
    chat.switch_branch(-1, 0)
    assert chat.messages[-1]["content"] == "You are welcome."
    with pytest.raises(ValueError, match="user message"):
        chat.branches(0)
    with pytest.raises(IndexError):
        chat.switch_branch(1, 5)


def test_edit_drops_what_followed_and_regenerate_answers(mt):
    model, tok = mt
    chat = Chat(model, tok, system="S")
    chat.send("First question", sampler=say(tok, "First answer."))
    chat.send("Second question", sampler=say(tok, "Second answer."))
    chat.edit(3, "Second question, edited")
    assert [m["content"] for m in chat.messages] == ["S", "First question", "First answer.", "Second question, edited"]
    r = list(chat.regenerate(sampler=say(tok, "Edited answer.")))[-1]
    assert chat.messages[-1]["content"] == "Edited answer."
    assert r.prompt_tokens < len(render(chat, chat.messages[:4], True)) // 2
    with pytest.raises(ValueError, match="assistant"):
        chat.edit(2, "x")
    with pytest.raises(ValueError, match="system"):
        chat.edit(0, "x")
    with pytest.raises(IndexError):
        chat.edit(9, "x")
    assert_cache_consistent(chat)


def test_closing_the_stream_keeps_the_partial_reply(mt):
    model, tok = mt
    chat = Chat(model, tok)
    stream = chat.stream(
        "Tell me a story", sampler=scripted(tok.encode("Once upon a time there was a fox", add_special_tokens=False))
    )
    got = "".join(next(stream).text for _ in range(3))
    with pytest.raises(RuntimeError, match="still being generated"):
        chat.send("again")
    stream.close()
    last = chat.last_reply
    assert last.finish_reason == "cancelled" and last.startswith(got) and len(last) > 0
    assert_cache_consistent(chat)
    held = len(chat._cache_tokens)
    after = chat.send("Go on", sampler=say(tok, "The end."))
    assert after == "The end."
    assert after.stats.prompt_tokens == len(render(chat, chat.messages[:-1], True)) - held


def test_cancel_event_from_another_thread(mt):
    model, tok = mt
    chat = Chat(model, tok, max_tokens=2000)
    cancel, started = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.wait(10), cancel.set()))
    worker.start()
    for r in chat.stream("Count to a thousand", cancel=cancel, logit_bias={next(iter(tok.eos_token_ids)): -1e4}):  # noqa: B007 (read after the loop)
        started.set()
    worker.join()
    assert r.finish_reason == "cancelled" and chat.last_reply.finish_reason == "cancelled"
    assert_cache_consistent(chat)


def test_context_policy_refuse(mt):
    model, tok = mt
    chat = Chat(model, tok, max_context=60)
    chat.send("Hi", sampler=say(tok, "Hello."))
    before = chat.messages
    with pytest.raises(ContextOverflowError, match="context window of 60"):
        chat.send("The quick brown fox jumps over the lazy dog. " * 4)
    assert chat.messages == before  # the refused message was not added
    assert chat.context_used <= chat.context_limit == 60


def test_context_policy_drop_oldest(mt):
    model, tok = mt
    chat = Chat(model, tok, context_policy="drop_oldest", max_context=90, system="S")
    for i in range(4):
        chat.send(f"Question number {i}", sampler=say(tok, f"Answer number {i}."))
    assert chat.dropped and chat.dropped[0] == {"role": "user", "content": "Question number 0"}
    assert chat.messages[0] == {"role": "system", "content": "S"}
    assert chat.messages[-1]["content"] == "Answer number 3."
    assert chat.context_used <= 90
    assert_cache_consistent(chat)
    with pytest.raises(ContextOverflowError):
        chat.send("word " * 200)  # too long even alone


def test_reply_ends_with_context_at_the_window(mt):
    model, tok = mt
    chat = Chat(model, tok, max_context=50)
    r = chat.send("Hi", logit_bias={next(iter(tok.eos_token_ids)): -1e4})
    assert r.finish_reason == "context"
    assert r.stats.prompt_tokens + r.stats.generation_tokens == 50


def test_sampling_defaults_and_overrides(mt):
    model, tok = mt
    chat = Chat(model, tok, max_tokens=3, temperature=0.0)
    assert chat.send("Hi").stats.generation_tokens <= 3
    assert chat.send("Hi", max_tokens=1).stats.generation_tokens == 1
    chat.sampling["max_tokens"] = 2
    assert chat.send("Hi").stats.generation_tokens <= 2
    with pytest.raises(TypeError, match="unknown generation setting"):
        chat.send("Hi", temprature=1)


def test_save_and_load_round_trip(mt, tmp_path):
    model, tok = mt
    chat = Chat(model, tok, system="Sys ✓ 你好", temperature=0.0, max_tokens=5, stop=["\n\n"], logit_bias={3: -2.0})
    chat.send("Hello", sampler=say(tok, "Hi."))
    list(chat.regenerate(sampler=say(tok, "Hey.")))
    chat.send("How are you?", sampler=say(tok, "Fine."))
    path = tmp_path / "chat.json"
    chat.save(path)
    loaded = Chat.load(path, model, tok)
    assert loaded.messages == chat.messages and loaded.system == "Sys ✓ 你好"
    assert loaded.branches(2) == ["Hi.", "Hey."] and loaded.active_branch(2) == 1
    assert loaded.sampling == chat.sampling and loaded.last_reply.finish_reason == "stop"
    assert loaded._cache is None
    assert json.loads(path.read_text(encoding="utf-8"))["format"] == "qwen2-mlx-chat"


def test_save_with_cache_resumes_without_prefilling_again(mt, tmp_path):
    model, tok = mt
    chat = Chat(model, tok, system="You answer questions about foxes.")
    chat.send("What colour is the fox?", sampler=say(tok, "Brown."))
    chat.save(tmp_path / "c.json", include_cache=True)
    assert (tmp_path / "c.kv.safetensors").exists()
    loaded = Chat.load(tmp_path / "c.json", model, tok)
    assert loaded._cache_tokens == chat._cache_tokens
    held = len(chat._cache_tokens)
    a = chat.send("Does it jump?", max_tokens=6)
    b = loaded.send("Does it jump?", max_tokens=6)
    assert a == b
    assert a.stats.prompt_tokens == b.stats.prompt_tokens == len(render(chat, chat.messages[:-1], True)) - held


def test_load_errors_name_the_file(mt, tmp_path):
    model, tok = mt
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ChatFileError, match="bad.json"):
        Chat.load(bad, model, tok)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ChatFileError, match="not a qwen2-mlx chat file"):
        Chat.load(bad, model, tok)
    bad.write_text(json.dumps({"format": "qwen2-mlx-chat", "version": 1, "messages": [{"role": "user"}]}))
    with pytest.raises(ChatFileError, match=r"messages\[0\]"):
        Chat.load(bad, model, tok)
    bad.write_text(json.dumps({"format": "qwen2-mlx-chat", "version": 1, "sampling": {"warmth": 1}}))
    with pytest.raises(ChatFileError, match="sampling"):
        Chat.load(bad, model, tok)
    bad.write_text(
        json.dumps(
            {"format": "qwen2-mlx-chat", "version": 1, "cache": {"file": "gone.kv.safetensors", "tokens": [1, 2]}}
        )
    )
    with pytest.warns(CacheIgnored, match="gone.kv.safetensors.*the cache is not used"):
        assert Chat.load(bad, model, tok)._cache is None  # the messages load; the missing cache is not needed
    with pytest.raises(ChatFileError, match="no such chat file"):
        Chat.load(tmp_path / "missing.json", model, tok)


def test_clear_keeps_the_system_prefix_cached(mt):
    model, tok = mt
    chat = Chat(model, tok, system="A long system prompt about foxes, dogs and other animals.")
    chat.send("One", sampler=say(tok, "Yes."))
    chat.clear()
    assert chat.messages == [{"role": "system", "content": chat.system}]
    r = chat.send("Two", sampler=say(tok, "No."))
    assert r.stats.prompt_tokens < len(render(chat, chat.messages[:2], True)) // 2


def test_markdown_transcript(mt):
    model, tok = mt
    chat = Chat(model, tok, system="S")
    chat.send("**bold?**", sampler=say(tok, "Yes."))
    md = chat._repr_markdown_()
    assert "**user**" in md and "**bold?**" in md and "Yes." in md


def test_common_prefix():
    assert _common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert _common_prefix([], [1]) == 0
    assert _common_prefix([1, 2], [1, 2, 3]) == 2


# --- the real model --------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_model_follow_up_regenerate_and_edit(request):
    model, tok = real_model_or_skip(request)
    chat = Chat(model, tok, max_tokens=6)
    first = chat.send("Name one prime number.")
    assert first and first.finish_reason in ("stop", "length")
    second = chat.send("And another one?")
    full = len(chat._tokens(chat.messages[:3], True))
    assert second.stats.prompt_tokens < full // 2  # only the new turn went through prefill
    assert_cache_consistent(chat)

    old = chat.messages[-1]["content"]
    regen = list(chat.regenerate(temperature=0.8, seed=1))[-1]
    assert regen.prompt_tokens == 1
    assert chat.branches(3)[0] == old and len(chat.branches(3)) == 2
    assert_cache_consistent(chat)

    chat.edit(0, "Name one even number.")
    assert chat.messages == [{"role": "user", "content": "Name one even number."}]
    edited = list(chat.regenerate())[-1]
    assert edited.finish_reason in ("stop", "length") and chat.messages[-1]["role"] == "assistant"
    # the template's default system block before the edited message stayed cached
    assert edited.prompt_tokens < len(chat._tokens(chat.messages[:1], True)) // 2
    assert_cache_consistent(chat)


def test_assigning_messages_keeps_the_cache_for_the_common_prefix(mt):
    model, tok = mt
    chat = Chat(model, tok, system="S")
    chat.send("First question", sampler=say(tok, "First answer."))
    chat.send("Second question", sampler=say(tok, "Second answer."))
    before = list(chat._cache_tokens)
    chat.messages = chat.messages[:3]  # a front end moves to another branch: the first exchange
    assert chat.system == "S" and len(chat.messages) == 3
    r = chat.send("Another second question", sampler=say(tok, "Another answer."))
    ids = render(chat, chat.messages[:4], True)
    assert r.stats.prompt_tokens == len(ids) - _common_prefix(before, ids) < len(ids) // 2
    chat.messages = [{"role": "system", "content": "T"}, {"role": "user", "content": "u"}]
    assert chat.system == "T" and chat.messages[-1] == {"role": "user", "content": "u"}
    with pytest.raises(ValueError, match="only come first"):
        chat.messages = [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}]
    with pytest.raises(ValueError, match="both given"):
        Chat(model, tok, system="A", messages=[{"role": "system", "content": "B"}])


@pytest.mark.parametrize("dca", [False, True])
def test_a_reused_cache_answers_like_a_fresh_prefill(mt, dca):
    import copy

    from mlx.utils import tree_flatten

    from qwen2_mlx.models.config import DCAConfig
    from qwen2_mlx.models.model import Model

    model, tok = mt
    if dca:  # chunks of 16 tokens: the conversation runs well past one chunk
        args = copy.deepcopy(model.args)
        args.dual_chunk_attention_config = DCAConfig(chunk_size=16, local_size=4)
        model, weights = Model(args), tree_flatten(model.parameters())
        model.load_weights(list(weights))
    chat = Chat(model, tok, system="S")
    chat.send("First question", sampler=say(tok, "First answer."))
    chat.send("Second question", sampler=say(tok, "Second answer."))
    list(chat.regenerate(sampler=say(tok, "Other answer.")))  # a trim back and a re-prefill on the way
    reused = chat.send("Third question", max_tokens=8)
    fresh = Chat(model, tok, messages=chat.messages[:-2]).send("Third question", max_tokens=8)
    assert reused == fresh
    assert reused.stats.prompt_tokens < fresh.stats.prompt_tokens // 2
