"""Fuzzing qwen2-serve: arbitrary JSON in every field of both APIs, sent to a real server process.

Hypothesis draws a field (top-level or nested: a message's role and content, a tool, a schema)
and any JSON value for it (null, booleans, integers of any size, floats including NaN and
Infinity, strings with any code point, nested lists and objects), puts it into an otherwise valid
request and sends it. Whatever comes back must be a 2xx or a 4xx in the API's error shape, never
a 5xx or a hang, and the server must stay up: every few examples, and at the end, a plain greedy
request must still equal the library's own reply.

Bounded for CI: QWEN2_FUZZ_EXAMPLES examples per API (default 120, about a minute in all on a
2-core CPU); a longer run: `QWEN2_FUZZ_EXAMPLES=2000 python -m pytest tests/test_serve_fuzz.py -s`.
The tiny model's window is 256 tokens, so no drawn max_tokens can make a reply long.
"""

from __future__ import annotations

import collections
import json
import os
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_support import ServerProcess
from tiny import DENSE, make_checkpoint

NAME = "tiny-fuzz"
EXAMPLES = int(os.environ.get("QWEN2_FUZZ_EXAMPLES", "120"))
HELLO = [{"role": "user", "content": "Hello there"}]

CHAT_FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "seed", "n", "stop", "stream", "stream_options", "tools", "tool_choice", "response_format", "logprobs",
    "top_logprobs", "messages.0", "messages.0.role", "messages.0.content", "messages.0.tool_calls",
    "stream_options.include_usage", "response_format.type", "response_format.json_schema",
    "response_format.json_schema.schema", "tools.0", "tools.0.function", "tools.0.function.parameters",
]  # fmt: skip
COMPLETION_FIELDS = [
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop",
    "stream", "logprobs", "echo", "prompt.0",
]  # fmt: skip
MESSAGES_FIELDS = [
    "model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k", "stop_sequences", "stream",
    "tools", "tool_choice", "output_config", "output_format", "messages.0", "messages.0.role",
    "messages.0.content", "messages.0.content.0", "output_config.format", "output_config.format.schema",
    "tools.0", "tools.0.input_schema",
]  # fmt: skip

BASES = {
    "/v1/chat/completions": (
        CHAT_FIELDS,
        {
            "model": NAME,
            "messages": [{"role": "user", "content": "Hi", "tool_calls": []}],
            "max_tokens": 3,
            "stream_options": {"include_usage": True},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        },
    ),
    "/v1/completions": (COMPLETION_FIELDS, {"model": NAME, "prompt": ["Hi"], "max_tokens": 3}),
    "/v1/messages": (
        MESSAGES_FIELDS,
        {
            "model": NAME,
            "max_tokens": 3,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        },
    ),
}

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and +-Infinity included: json.dumps writes them as the non-standard literals
    | st.text(alphabet=st.characters(codec=None), max_size=40)  # surrogates included
    | st.sampled_from(["user", "assistant", "system", "tool", "text", "json_schema", "json_object", "function"])
)
# Values at the edges of what a field takes, drawn as often as all the others together.
edges = st.sampled_from(
    [-1, 0, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**200, -(10**200), 0.5, 2.5, 1e308, -1e-300]
    + [float("nan"), float("inf"), float("-inf"), "", "\ud800", "a\udfffb", "\x00", [], {}, [[[[[]]]]]]
    + [[0], [1, 2, 3], ["x"], [{"type": "text", "text": "hi"}], {"type": "object"}, {"$ref": "#"}, True, None]
)
values = edges | st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def put(body: dict, field: str, value) -> dict:
    """A deep copy of `body` with `field` (a dotted path; numbers index lists) set to `value`."""
    body = json.loads(json.dumps(body))
    *path, last = field.split(".")
    node = body
    for p in path:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if not isinstance(node, (dict, list)):
            return body
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return body


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / NAME
    make_checkpoint(path, DENSE, max_position_embeddings=256)
    s = ServerProcess(path, "--max-concurrency", "2", log=tmp_path_factory.mktemp("fuzz-log") / "server.log")
    s.model_path = path
    yield s
    s.stop()


@pytest.fixture(scope="module")
def solo(server):
    from qwen2_mlx import load
    from qwen2_mlx.generation.generate import generate

    model, tok = load(server.model_path)
    ids = tok.encode(tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False))
    return generate(model, tok, ids, 6, temperature=0.0)


STATS: dict = collections.defaultdict(collections.Counter)


def check_reply(r: httpx.Response, path: str) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        body = r.json()
        if path == "/v1/messages":
            assert body["type"] == "error" and body["error"]["message"]
        else:
            assert body["error"]["message"] and body["error"]["type"]


def still_right(client: httpx.Client, solo: str) -> None:
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == solo


@pytest.mark.parametrize("path", list(BASES))
def test_arbitrary_json_in_any_field_never_gives_a_5xx_and_the_server_goes_on(server, solo, path):
    fields, base = BASES[path]
    client = httpx.Client(base_url=server.url, timeout=60)
    tic = time.perf_counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=os.environ.get("QWEN2_FUZZ_RANDOM") is None,  # the same examples each CI run
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(field=st.sampled_from(fields), value=values)
    def one(field, value):
        body = put(base, field, value)
        raw = json.dumps(body)  # allow_nan: NaN/Infinity go out as the literals some clients send
        r = client.post(
            path, content=raw.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"}
        )
        STATS[path][(field, r.status_code // 100)] += 1
        check_reply(r, path)
        if sum(STATS[path].values()) % 25 == 0:
            still_right(client, solo)

    try:
        r = client.post(path, json=base)
        assert r.status_code == 200, r.text  # the request every example changes one field of is a good one
        one()
        still_right(client, solo)
        assert server.health()["status"] == "ok" and server.health()["restarts"] == 0
    finally:
        client.close()
        per_field = collections.Counter()
        for (field, _), n in STATS[path].items():
            per_field[field] += n
        by_class = collections.Counter()
        for (_, cls), n in STATS[path].items():
            by_class[f"{cls}xx"] += n
        print(
            f"\nfuzz {path}: {sum(per_field.values())} requests in {time.perf_counter() - tic:.1f}s, "
            f"{dict(by_class)}; per field: {dict(sorted(per_field.items()))}"
        )
