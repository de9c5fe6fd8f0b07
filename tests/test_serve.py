"""qwen2-serve on a tiny random model: one real server process for the module, driven by the official
`openai` and `anthropic` clients and raw HTTP (httpx). Replies are compared with the library's own
greedy decoding of the same prompt, alone and while other requests share the batch."""

from __future__ import annotations

import json
import threading
import time

import anthropic
import httpx
import jsonschema
import openai
import pytest
from serve_support import ServerProcess
from tiny import DENSE, make_checkpoint

KEY = "test-key-123"
NAME = "tiny-chat"
T0 = {"temperature": 0}  # anthropic 2.x takes sampling settings only through extra_body


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / NAME
    make_checkpoint(path, DENSE)
    return path


SAVED = [{"role": "user", "content": "A saved conversation about the lazy dog."}]


@pytest.fixture(scope="module")
def saved_chat(tiny_path, tmp_path_factory):
    """A chat saved with its KV cache, as qwen2-chat or the Python API writes it."""
    from qwen2_mlx import Chat, load

    chat = Chat(*load(tiny_path), max_tokens=5)
    chat.send(SAVED[0]["content"])
    path = tmp_path_factory.mktemp("chats") / "saved.json"
    chat.save(path, include_cache=True)
    return path, chat.messages, len(chat._cache_tokens)


@pytest.fixture(scope="module")
def server(tiny_path, tmp_path_factory, saved_chat):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    args = ["--api-key", KEY, "--max-concurrency", "3", "--queue-size", "1", "--chat", str(saved_chat[0])]
    s = ServerProcess(tiny_path, *args, log=log)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(tiny_path):
    """The library's own greedy reply to a chat, for comparison."""
    from qwen2_mlx import load
    from qwen2_mlx.generation.generate import generate

    model, tokenizer = load(tiny_path)

    def reply(messages, max_tokens, **kw):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        return generate(model, tokenizer, ids, max_tokens, **kw), len(ids)

    reply.tokenizer = tokenizer
    return reply


def chat(oai, content, max_tokens=12, **kw):
    return oai.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0, **kw
    )


def headers(key=KEY):
    return {"Authorization": f"Bearer {key}"} if key else {}


# A reply that cannot end before max_tokens: at least 3000 digits in a JSON array (no early end of turn).
ENDLESS = {
    "type": "json_schema",
    "json_schema": {
        "name": "digits",
        "schema": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 3000},
    },
}


# --- OpenAI ------------------------------------------------------------------------------------------


def test_a_saved_chat_starts_warm(server, oai, saved_chat):
    _, messages, held = saved_chat
    h = httpx.get(server.url + "/health").json()  # no key needed
    assert h["status"] == "ok" and h["model"] == NAME and h["batching"] is True and h["cached_sequences"] == 1
    r = oai.chat.completions.create(
        model=NAME, messages=messages + [{"role": "user", "content": "More?"}], max_tokens=3, temperature=0
    )
    assert r.usage.prompt_tokens_details.cached_tokens >= held - 1


def test_health_and_models(server, oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == [NAME]


def test_chat_equals_the_librarys_greedy_reply_streamed_or_not(oai, local):
    msgs = [{"role": "user", "content": "Hello, how are you?"}]
    want, n_prompt = local(msgs, 16)
    r = oai.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == str(want)
    assert r.choices[0].finish_reason == "length" == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 16)
    chunks = list(
        oai.chat.completions.create(
            model=NAME,
            messages=msgs,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == str(want)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    # the second request found the first one's cache: all but the last prompt token
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == n_prompt - 1


def test_concurrent_requests_each_equal_their_solo_reply(oai, local):
    prompts = ["The quick brown fox", "你好，世界", "def main():", "Привет мир", "emoji 🎉 time", "I am fine"]
    want = {p: str(local([{"role": "user", "content": p}], 20)[0]) for p in prompts}
    got = {}

    def run(p):
        got[p] = chat(oai, p, 20).choices[0].message.content

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts[:4]]  # 3 slots + 1 queued
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in prompts[:4]:
        assert got[p] == want[p], p


def test_stop_sequences(oai, claude, local):
    msgs = [{"role": "user", "content": "Tell me about the lazy dog"}]
    full = str(local(msgs, 24)[0])
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip() and full[i] != "\ufffd")
    want = full[: full.index(stop)]
    r = oai.chat.completions.create(model=NAME, messages=msgs, max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    m = claude.messages.create(model=NAME, messages=msgs, max_tokens=24, stop_sequences=["zzzz", stop], extra_body=T0)
    assert m.content[0].text == want
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", stop)


def test_follow_up_turn_prefills_only_new_tokens(oai):
    first = [{"role": "user", "content": "Tell me something about foxes in the forest."}]
    r1 = oai.chat.completions.create(model=NAME, messages=first, max_tokens=6, temperature=0)
    second = first + [
        {"role": "assistant", "content": "Foxes are quick."},  # as a client would send its edited history
        {"role": "user", "content": "And dogs?"},
    ]
    r2 = oai.chat.completions.create(model=NAME, messages=second, max_tokens=6, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens - 1  # the whole first prompt came from the cache
    assert r2.usage.prompt_tokens - cached < r2.usage.prompt_tokens - r1.usage.prompt_tokens + 2
    r3 = oai.chat.completions.create(model=NAME, messages=second, max_tokens=6, temperature=0)
    assert r3.usage.prompt_tokens_details.cached_tokens == r2.usage.prompt_tokens - 1  # the same turn again
    assert r3.choices[0].message.content == r2.choices[0].message.content


def test_json_schema_output_parses_and_validates(oai):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        },
        "required": ["name", "age", "pets"],
        "additionalProperties": False,
    }
    for seed in (1, 2):
        r = oai.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "A person as JSON"}],
            max_tokens=80,
            temperature=1.0,
            seed=seed,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": schema, "strict": True},
            },
        )
        value = json.loads(r.choices[0].message.content)
        jsonschema.validate(value, schema)
        assert r.choices[0].finish_reason == "stop"
    r = oai.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    content = r.choices[0].message.content
    assert content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_seeded_sampling_repeats_alongside_other_requests(oai):
    a = chat(oai, "hello", 16, seed=7).choices[0].message.content  # temperature 0 in chat(): override below
    r1 = oai.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=16, temperature=1.0, seed=7
    )
    other = threading.Thread(target=chat, args=(oai, "a different prompt", 30))
    other.start()
    r2 = oai.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=16, temperature=1.0, seed=7
    )
    other.join()
    assert r1.choices[0].message.content == r2.choices[0].message.content != a


def test_logprobs_and_text_completions(oai, server, local):
    r = oai.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for e in content:
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-4)  # greedy: the chosen one is the top
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    c = oai.completions.create(model=NAME, prompt="The quick brown", max_tokens=6, temperature=0, logprobs=2)
    assert c.choices[0].finish_reason == "length" and len(c.choices[0].logprobs.tokens) == 6
    ids = local.tokenizer.encode("The quick brown", add_special_tokens=False)
    raw = httpx.post(
        server.url + "/v1/completions",
        json={"model": NAME, "prompt": ids, "max_tokens": 6, "temperature": 0},
        headers=headers(),
    ).json()
    assert raw["choices"][0]["text"] == c.choices[0].text


# --- Anthropic ---------------------------------------------------------------------------------------


def test_anthropic_messages_streamed_and_not(claude, local):
    msgs = [{"role": "user", "content": "Hello, how are you?"}]
    want, n_prompt = local([{"role": "system", "content": "Be brief."}] + msgs, 10)
    m = claude.messages.create(model=NAME, system="Be brief.", messages=msgs, max_tokens=10, extra_body=T0)
    assert m.content[0].text == str(want) and m.stop_reason == "max_tokens"
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == n_prompt and m.usage.output_tokens == 10
    with claude.messages.stream(model=NAME, system="Be brief.", messages=msgs, max_tokens=10, extra_body=T0) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == str(want) and final.stop_reason == "max_tokens"
    assert final.usage.cache_read_input_tokens == n_prompt - 1


def test_anthropic_event_sequence(server):
    body = {"model": NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, headers={"x-api-key": KEY}) as r:
        events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in events and "content_block_stop" in events


# --- bad input, limits, disconnects -------------------------------------------------------------------


def _post(server, path, body, key=KEY, raw=None):
    data = raw if raw is not None else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers=headers(key) | {"content-type": "application/json"})


BAD_CHAT = [
    (None, "{not json", 400, "not valid JSON"),
    (None, "[1, 2]", 400, "JSON object"),
    ({"model": NAME, "messages": "hi"}, None, 400, "'messages' must be a list"),
    ({"model": NAME, "messages": []}, None, 400, "at least one message"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, None, 400, "role"),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, None, 400, "content"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, None, 400, "temperature"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, None, 400, "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": 2}, None, 400, "'n'"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, None, 404, "gpt-9"),
    (
        {
            "model": NAME,
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "bogus"}}},
        },
        None,
        400,
        "bogus",
    ),
]


@pytest.mark.parametrize("body,raw,status,words", BAD_CHAT)
def test_bad_chat_requests_get_openai_errors_and_the_server_goes_on(server, oai, body, raw, status, words):
    r = _post(server, "/v1/chat/completions", body, raw=raw)
    assert r.status_code == status
    err = r.json()["error"]
    assert words in err["message"] and err["type"]
    assert chat(oai, "still there?", 3).choices[0].finish_reason == "length"


def test_bad_anthropic_requests_get_anthropic_errors(server, claude):
    ok = {"model": NAME, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ({k: v for k, v in ok.items() if k != "max_tokens"}, 400, "max_tokens"),
        (dict(ok, messages=[]), 400, "at least one message"),
        (dict(ok, messages=[{"role": "system", "content": "x"}]), 400, "role"),
        (dict(ok, model="claude-9"), 404, "claude-9"),
        (dict(ok, temperature=3), 400, "temperature"),
    ]
    for body, status, words in cases:
        r = _post(server, "/v1/messages", body)
        assert r.status_code == status, body
        assert r.json()["type"] == "error" and words in r.json()["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-9", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    # The server still answers: a reply of at most 5 tokens. Which way it ends depends on whether an
    # earlier test's request is still in the batch (a random tiny model's argmax follows batch numerics).
    reply = claude.messages.create(**ok)
    assert reply.stop_reason in ("max_tokens", "end_turn") and 1 <= reply.usage.output_tokens <= 5


def test_a_prompt_longer_than_the_window_is_refused_with_its_sizes(oai):
    with pytest.raises(openai.BadRequestError) as e:
        chat(oai, "fox " * 17000, 5)
    msg = str(e.value)
    assert "16384" in msg and "context window" in msg  # 4 trained windows: long context is on by default
    assert chat(oai, "fox " * 5000, 2).usage.prompt_tokens > 4096  # past the trained window, on DCA
    assert chat(oai, "short", 3).choices[0].finish_reason == "length"


def test_api_key(server, tiny_path):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in ("", "wrong"):
        r = _post(server, "/v1/chat/completions", body, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = _post(server, "/v1/messages", dict(body, max_tokens=2), key="wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"x-api-key": KEY})
    assert r.status_code == 200


def test_queue_limit_429_and_disconnects_cancel(server, oai, local):
    """3 slots + 1 waiting: a 5th request gets 429; closing the streams frees the server at once."""
    msgs = [{"role": "user", "content": "Write a long story."}]
    streams = []
    for _ in range(4):
        s = oai.chat.completions.create(
            model=NAME, messages=msgs, max_tokens=4000, stream=True, response_format=ENDLESS
        )
        streams.append(s)
    first = next(iter(streams[0]))  # the first stream is running
    assert first.choices[0].delta.role == "assistant"
    deadline = time.time() + 20
    while time.time() < deadline:
        h = server.health()
        if h["running"] + h["waiting"] == 4:
            break
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError):
        chat(oai, "one too many", 2)
    r = _post(server, "/v1/messages", {"model": NAME, "max_tokens": 2, "messages": msgs})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    for s in streams:
        s.close()
    h = server.wait_idle(timeout=15)
    assert h["finished"]["cancelled"] >= 4
    want = str(local([{"role": "user", "content": "after the storm"}], 10)[0])
    assert chat(oai, "after the storm", 10).choices[0].message.content == want


def test_a_disconnect_mid_stream_cancels_and_the_next_request_is_right(server, oai, local):
    msgs = [{"role": "user", "content": "Count to a thousand."}]
    body = {"model": NAME, "messages": msgs, "max_tokens": 4000, "stream": True, "response_format": ENDLESS}
    before = server.health()["finished"].get("cancelled", 0)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers()) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in got)
    h = server.wait_idle(timeout=10)  # 4000 tokens would take far longer: the disconnect cancelled them
    assert h["finished"]["cancelled"] == before + 1
    want = str(local(msgs, 12)[0])
    assert chat(oai, "Count to a thousand.", 12).choices[0].message.content == want
    # the cancelled request's cache was kept consistent: the same prompt again reuses it
    r = chat(oai, "Count to a thousand.", 12)
    assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1


def test_non_streamed_request_cancelled_when_the_client_goes(server, oai):
    body = {"model": NAME, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 4000}
    body["response_format"] = ENDLESS
    before = server.health()["finished"].get("cancelled", 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers(), timeout=1.5)
    h = server.wait_idle(timeout=5)  # 4000 tokens would take far longer: cancelled as the client went
    assert h["finished"]["cancelled"] == before + 1


# --- Dual Chunk Attention (chunk 64 here): batched within 65 tokens, alone past them ------------------

DCA = {"chunk_size": 64, "local_size": 8, "original_max_position_embeddings": 0}  # what --dca-chunk-size 64 gives


@pytest.fixture(scope="module")
def serial(tiny_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "serial.log"
    s = ServerProcess(tiny_path, "--dca-chunk-size", "64", "--model-name", "dca", log=log)
    yield s, openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
    s.stop()


def test_dca_requests_batch_cross_the_edge_alone_and_equal_the_library(serial, tiny_path):
    """Long prompts run alone; short ones batch, and those whose reply crosses 65 tokens go on alone
    from their batch cache (converted to DCA's): every reply equals the library's DCA reply."""
    from qwen2_mlx import load
    from qwen2_mlx.generation.generate import generate

    server, client = serial
    assert server.health()["batching"] is True
    model, tokenizer = load(tiny_path, dca=DCA)
    long = ["The quick brown fox jumps over the lazy dog. " * 6 + str(i) for i in range(2)]
    cases = [(p, 12) for p in long] + [("Hi " + str(i), m) for i, m in enumerate((8, 45, 60))]
    want, got = {}, {}
    for p, m in cases:
        ids = tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        assert (len(ids) > 65) == (p in long) and (len(ids) + m > 65) == (m != 8)
        reply = generate(model, tokenizer, ids, m)
        want[p] = (str(reply), reply.stats.generation_tokens)

    def run(p, m):
        r = client.chat.completions.create(
            model="dca",
            messages=[{"role": "user", "content": p}],
            max_tokens=m,
            temperature=0,
        )
        got[p] = (r.choices[0].message.content, r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens)

    threads = [threading.Thread(target=run, args=c) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {p: g[:2] for p, g in got.items()} == want
    assert [want[p][1] for p, _ in cases[3:]] == [45, 60]  # these replies really crossed the edge
    # the long prompts share their first ~60 tokens: the later one started from the earlier one's cache
    assert max(got[p][2] for p in long) > 50
    run(*cases[-1])  # from the cache its crossing left, now a DCA cache past the edge
    assert got[cases[-1][0]][:2] == want[cases[-1][0]]


def test_dca_disconnect_cancels(serial):
    server, _ = serial
    before = server.health()["finished"].get("cancelled", 0)
    body = {"model": "dca", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000, "stream": True}
    body["response_format"] = ENDLESS
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(4)]
    assert server.wait_idle(timeout=10)["finished"]["cancelled"] == before + 1


def test_a_chat_saved_under_plain_attention_starts_cold_with_a_warning(tiny_path, tmp_path_factory):
    """A --chat file saved before long context was on by default: its cache is never read into the DCA
    model; the server says why and serves the conversation cold."""
    from qwen2_mlx import Chat, load

    chat = Chat(*load(tiny_path, long_context="off"), max_tokens=3)
    chat.send("Hello")
    path = tmp_path_factory.mktemp("old-chat") / "old.json"
    chat.save(path, include_cache=True)
    log = tmp_path_factory.mktemp("serve-log") / "old.log"
    s = ServerProcess(tiny_path, "--chat", str(path), log=log)
    try:
        assert s.health()["cached_sequences"] == 0
        assert "the conversation starts cold" in log.read_text() and "dual_chunk_attention_config" in log.read_text()
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=NAME, messages=chat.messages, max_tokens=3, temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        s.stop()
