"""qwen2-serve against a hostile client (issue 22's numbered cases 1-5), on a real server process.

Each case is a request that once took the server down, returned a 500 with internal text, dropped
the keep-alive connection or was accepted with nonsense; now each is a 4xx in the API's own shape
(or a correct reply), and afterwards the server answers a greedy request exactly as the library
does alone. Fuzzing of every field is in test_serve_fuzz.py.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading

import httpx
import pytest
from serve_support import ROOT, ServerProcess
from tiny import DENSE, make_checkpoint

NAME = "tiny-hostile"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / NAME
    make_checkpoint(path, DENSE)
    return path


@pytest.fixture(scope="module")
def server(tiny_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("hostile-log") / "server.log"
    s = ServerProcess(tiny_path, "--max-concurrency", "4", "--max-body-bytes", "1MB", log=log)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def solo(tiny_path):
    """The library's greedy reply to HELLO, alone."""
    from qwen2_mlx import load
    from qwen2_mlx.generation.generate import generate

    model, tok = load(tiny_path)
    ids = tok.encode(tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False))
    return {n: generate(model, tok, ids, n, temperature=0.0) for n in (8, 40)}


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def greedy(client, n=8, **extra):
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": n, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def post(client, path, raw):
    return client.post(path, content=raw, headers={"content-type": "application/json"})


def assert_refused(r, status, words, anthropic=False):
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    if anthropic:
        assert body["type"] == "error" and err["type"]
    else:
        assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"], err["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text


# 1 ------------------------------------------------------------------------------------------------
def test_1_seeds_out_of_range_are_refused_and_negative_ones_normalized(client, server, solo):
    for seed, status in ((-1, 200), (2**63 - 1, 200), (2**64, 400), (-(2**63) - 1, 400)):
        r = client.post(
            "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4, "temperature": 0.7, "seed": seed}
        )
        assert r.status_code == status, (seed, r.text)
        if status == 400:
            assert_refused(r, 400, "seed")
    # the same seed repeats: -1 is a seed like any other
    a, b = (
        client.post(
            "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 6, "temperature": 0.9, "seed": -1}
        ).json()["choices"][0]["message"]["content"]
        for _ in range(2)
    )
    assert a == b
    assert server.health()["status"] == "ok" and greedy(client) == solo[8]


# 2 ------------------------------------------------------------------------------------------------
SELF_REF = {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}


def _beside_a_greedy_stream(server, solo, body):
    """Run `body` while a greedy stream of 40 tokens runs; the stream must equal its solo reply."""
    out = {}

    def stream():
        text = []
        with httpx.Client(base_url=server.url, timeout=120) as c:
            body = {"messages": HELLO, "max_tokens": 40, "temperature": 0, "stream": True}
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        text.append(chunk["choices"][0]["delta"].get("content") or "")
        out["stream"] = "".join(text)

    t = threading.Thread(target=stream)
    t.start()
    with httpx.Client(base_url=server.url, timeout=120) as c:
        out["other"] = c.post("/v1/chat/completions", json=body)
    t.join(120)
    assert out["stream"] == solo[40]
    return out["other"]


def test_2_a_failing_grammar_or_huge_top_k_ends_that_request_alone(server, client, solo):
    rf = {"type": "json_schema", "json_schema": {"name": "loop", "schema": SELF_REF}}
    r = _beside_a_greedy_stream(server, solo, {"messages": HELLO, "max_tokens": 3000, "response_format": rf})
    assert_refused(r, 400, "response_format")  # llguidance gives up on it at the first token
    r = _beside_a_greedy_stream(server, solo, {"messages": HELLO, "max_tokens": 5, "temperature": 1, "top_k": 10**9})
    assert r.status_code == 200, r.text
    h = server.health()
    assert h["status"] == "ok" and h["restarts"] == 0
    assert greedy(client) == solo[8]


# 3 ------------------------------------------------------------------------------------------------
def on_one_connection(server, path, raw):
    """Send `raw`, then a greedy request on the same keep-alive connection; the first response."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, body=raw.encode("utf-8", "surrogatepass"), headers=JSON)
        first = conn.getresponse()
        body = first.read()
        assert not first.will_close, "the server closed the connection after an error"
        sock = conn.sock
        greedy_body = json.dumps({"messages": HELLO, "max_tokens": 8, "temperature": 0})
        conn.request("POST", "/v1/chat/completions", body=greedy_body, headers=JSON)
        second = conn.getresponse()
        reply = json.loads(second.read())
        assert conn.sock is sock and second.status == 200
        return httpx.Response(first.status, content=body), reply["choices"][0]["message"]["content"]
    finally:
        conn.close()


JSON = {"content-type": "application/json"}
MSG = '[{"role": "user", "content": "x"}]'


def test_3_surrogates_huge_literals_and_deep_nesting_are_4xx_and_keep_alive_survives(server, solo):
    digits, msg = "9" * 5000, MSG
    cases = [
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "not valid Unicode",
            False,
        ),
        ("/v1/chat/completions", f'{{"messages": {msg}, "max_tokens": {digits}}}', "number", False),
        ("/v1/messages", f'{{"model": "m", "messages": {msg}, "max_tokens": {digits}}}', "number", True),
        ("/v1/chat/completions", "[" * 100_000 + "]" * 100_000, "deep", False),
        ("/v1/chat/completions", f'{{"messages": {"[" * 100 + "]" * 100}}}', "deep", False),
        ("/v1/messages", '{"system": "\\udfff"}', "not valid Unicode", True),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\udc80b"}]}', "Unicode", False),
    ]
    for path, raw, words, anthropic in cases:
        r, reply = on_one_connection(server, path, raw)
        assert_refused(r, 400, words, anthropic)
        assert reply == solo[8]


# 4 ------------------------------------------------------------------------------------------------
def test_4_nan_and_infinity_are_refused(client, solo):
    for field in ("temperature", "top_p", "min_p"):
        for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
            raw = f'{{"messages": {MSG}, "max_tokens": 3, "{field}": {literal}}}'
            r = post(client, "/v1/chat/completions", raw)
            assert_refused(r, 400, "number" if literal != "1e999" else field)
    raw = '{"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    assert_refused(post(client, "/v1/messages", raw), 400, "NaN", anthropic=True)
    assert greedy(client) == solo[8]


# 5 ------------------------------------------------------------------------------------------------
def test_5_a_body_over_the_limit_is_413_at_once(client, solo):
    big = json.dumps({"messages": [{"role": "user", "content": "fox " * 400_000}], "max_tokens": 3})
    r = post(client, "/v1/chat/completions", big)
    assert_refused(r, 413, "--max-body-bytes")
    assert r.headers.get("connection") == "close"
    r = post(client, "/v1/messages", big)
    assert_refused(r, 413, "--max-body-bytes", anthropic=True)
    assert greedy(client) == solo[8]


def _serve(*args, env=None):
    cmd = [sys.executable, "-m", "qwen2_mlx.serve", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_5_binding_beyond_loopback_needs_a_key_or_allow_no_key(tiny_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "QWEN2_SERVE_API_KEY"}
    r = _serve("--model", str(tiny_path), "--host", "0.0.0.0", "--port", "1", env=env)
    assert r.returncode == 2 and "without an API key" in r.stderr and "--allow-no-key" in r.stderr
    from qwen2_mlx.serve.cli import build_parser, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
    os.environ["QWEN2_SERVE_API_KEY"] = "from-env"
    try:
        assert build_parser().parse_args([]).api_key == "from-env"
    finally:
        del os.environ["QWEN2_SERVE_API_KEY"]


def test_5_the_key_from_the_environment_guards_a_wide_server(tiny_path, tmp_path):
    import os

    os.environ["QWEN2_SERVE_API_KEY"] = "env-key-5"
    try:
        s = ServerProcess(tiny_path, "--host", "0.0.0.0", log=tmp_path / "log")
    finally:
        del os.environ["QWEN2_SERVE_API_KEY"]
    try:
        body = {"messages": HELLO, "max_tokens": 2}
        assert httpx.post(s.url + "/v1/chat/completions", json=body).status_code == 401
        r = httpx.post(s.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer env-key-5"})
        assert r.status_code == 200
    finally:
        s.stop()
    assert "warning" not in (tmp_path / "log").read_text()  # a key: nothing to warn about


# the engine in-process: a row's failure, and a failed loop ----------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_path):
    from qwen2_mlx import load
    from qwen2_mlx.serve.engine import Engine

    model, tok = load(tiny_path)
    e = Engine(model, tok, model_name=NAME, max_concurrency=4)
    e.start()
    yield e
    e.close()


def run_jobs(engine, jobs):
    """Submit `jobs` together; each job's events, in order, up to its DoneEvent or ErrorEvent."""
    import asyncio

    from qwen2_mlx.serve.protocol import TokenEvent

    async def go():
        loop = asyncio.get_running_loop()
        for j in jobs:
            j.bind(loop)
            engine.submit(j)
        out = []
        for j in jobs:
            events = [await asyncio.wait_for(j.events.get(), 120)]
            while isinstance(events[-1], TokenEvent):
                events.append(await asyncio.wait_for(j.events.get(), 120))
            out.append(events)
        return out

    return asyncio.run(go())


def _prompt(engine, text):
    tok = engine.tokenizer
    return tok.encode(
        tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    )


def test_a_processor_failing_mid_batch_ends_its_row_alone_and_the_others_equal_their_solo_run(engine):
    from qwen2_mlx.serve.protocol import DoneEvent, ErrorEvent, Job, Sampling, TokenEvent

    def make(text, grammar=None):
        return Job(prompt=_prompt(engine, text), max_tokens=24, sampling=Sampling(temperature=0.0), grammar=grammar)

    def tokens(events):
        return [e.token for e in events if isinstance(e, TokenEvent)]

    solo = [run_jobs(engine, [make(t)])[0] for t in ("The quick brown fox", "Lorem ipsum dolor")]
    calls = []

    def breaks_at_step_4(tokens_so_far, logits):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("a processor bug")
        return logits

    events = run_jobs(engine, [make("The quick brown fox"), make("Jumps", breaks_at_step_4), make("Lorem ipsum dolor")])
    assert isinstance(events[1][-1], ErrorEvent) and events[1][-1].error.status == 500
    assert "processor bug" not in events[1][-1].error.message  # no internal text to the client
    assert len(tokens(events[1])) <= 4
    for mine, alone in zip((events[0], events[2]), solo):
        assert isinstance(mine[-1], DoneEvent) and tokens(mine) == tokens(alone)
    assert idle(engine)["healthy"]


def idle(engine, timeout=10.0) -> dict:
    """The engine's status once it has released every job (it answers a job just before releasing it)."""
    import time

    deadline = time.time() + timeout
    while (status := engine.status())["running"] or status["waiting"]:
        assert time.time() < deadline, status
        time.sleep(0.01)
    return status


def test_a_failed_engine_loop_fails_its_requests_restarts_and_health_tells(engine):
    from qwen2_mlx.serve.protocol import DoneEvent, ErrorEvent, Job, Sampling

    original, seen = engine._receive, []

    def receive_then_fail(waiting, block):
        going = original(waiting, block)
        if engine._held and not seen:  # a request is in the loop's hands
            seen.append(engine.status()["healthy"])
            raise RuntimeError("the loop broke")
        return going

    engine._receive = receive_then_fail
    try:
        job = Job(prompt=_prompt(engine, "Hi"), max_tokens=4, sampling=Sampling(temperature=0.0))
        (events,) = run_jobs(engine, [job])
        assert isinstance(events[-1], ErrorEvent) and "restarted" in events[-1].error.message
        status = idle(engine)
        assert status["restarts"] == 1 and status["healthy"] and status["waiting"] == status["running"] == 0
        again = Job(prompt=_prompt(engine, "Hi"), max_tokens=4, sampling=Sampling(temperature=0.0))
        assert isinstance(run_jobs(engine, [again])[0][-1], DoneEvent)
    finally:
        engine._receive = original


def test_an_unexpected_exception_is_a_500_without_its_text(engine):
    from starlette.testclient import TestClient

    from qwen2_mlx.serve.app import create_app

    class Broken:
        def apply_chat_template(self, *a, **k):
            raise RuntimeError("secret internals")

    app = create_app(engine)
    app.app.state.server.tokenizer = Broken()
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
        assert r.status_code == 500 and "secret" not in r.text and r.json()["error"]["type"] == "server_error"
        r = client.post("/v1/messages", json={"model": NAME, "max_tokens": 2, "messages": HELLO})
        assert r.status_code == 500 and r.json()["type"] == "error" and "secret" not in r.text
