"""qwen2-serve on the real Qwen2.5-Coder-0.5B-Instruct (float32): a server process driven by the
official clients. Greedy replies, so every figure below is deterministic."""

from __future__ import annotations

import json
import re

import anthropic
import jsonschema
import openai
import pytest
from serve_support import ServerProcess

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
T0 = {"temperature": 0}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def server(real_model_path, tmp_path_factory):
    s = ServerProcess(real_model_path, "--model-name", "qwen", log=tmp_path_factory.mktemp("serve-real") / "log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=300)


def cjk_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(bool(re.match(r"[\u4e00-\u9fff]", c)) for c in letters) / max(len(letters), 1)


def test_a_chinese_question_is_answered_in_chinese_streamed_or_not(oai, claude):
    msgs = [{"role": "user", "content": "中国的首都是哪座城市？请用一句中文回答。"}]
    r = oai.chat.completions.create(model="qwen", messages=msgs, max_tokens=30, temperature=0)
    text = r.choices[0].message.content
    assert "北京" in text and cjk_share(text) > 0.8, text
    stream = oai.chat.completions.create(model="qwen", messages=msgs, max_tokens=30, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    with claude.messages.stream(model="qwen", messages=msgs, max_tokens=30, extra_body=T0) as s:
        assert "".join(s.text_stream) == text


def test_follow_up_turn_prefills_exactly_its_new_tokens(oai, real_model_path):
    from qwen2_mlx.loading.tokenizer import load_tokenizer

    tok = load_tokenizer(real_model_path)
    first = [{"role": "user", "content": "What colour is a clear daytime sky? Answer in one word."}]
    r1 = oai.chat.completions.create(model="qwen", messages=first, max_tokens=20, temperature=0)
    assert r1.choices[0].finish_reason == "stop"
    second = first + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "And at night?"},
    ]
    r2 = oai.chat.completions.create(model="qwen", messages=second, max_tokens=20, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # the whole first turn (prompt, reply and its <|im_end|>) came from the cache...
    assert cached == r1.usage.prompt_tokens + r1.usage.completion_tokens
    # ...so the prefill was exactly the tokens the second turn adds
    n1 = len(tok.apply_chat_template(first + second[1:2], tokenize=True))
    assert r2.usage.prompt_tokens - cached == len(tok.apply_chat_template(second, add_generation_prompt=True)) - n1 + 1


def test_json_schema_output_parses_and_validates(oai, claude):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "country": {"type": "string"},
            "population_millions": {"type": "number"},
        },
        "required": ["city", "country", "population_millions"],
        "additionalProperties": False,
    }
    msgs = [{"role": "user", "content": "Describe Paris as JSON with city, country and population_millions."}]
    r = oai.chat.completions.create(
        model="qwen",
        messages=msgs,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
    )
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, schema)
    assert value["city"] == "Paris" and value["country"] == "France"
    m = claude.messages.create(
        model="qwen",
        messages=msgs,
        max_tokens=60,
        extra_body=dict(T0, output_config={"format": {"type": "json_schema", "schema": schema}}),
    )
    assert json.loads(m.content[0].text) == value


def test_tool_calls_as_openai_tool_calls_and_anthropic_tool_use(oai, claude):
    msgs = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    r = oai.chat.completions.create(model="qwen", messages=msgs, tools=[WEATHER], max_tokens=60, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    stream = oai.chat.completions.create(
        model="qwen", messages=msgs, tools=[WEATHER], max_tokens=60, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta for c in stream if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    # the call's result goes back, and the model answers from it
    follow = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'},
    ]
    r2 = oai.chat.completions.create(model="qwen", messages=follow, tools=[WEATHER], max_tokens=40, temperature=0)
    assert "18" in r2.choices[0].message.content
    tool = {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "input_schema": WEATHER["function"]["parameters"],
    }
    m = claude.messages.create(model="qwen", messages=msgs, tools=[tool], max_tokens=60, extra_body=T0)
    block = next(b for b in m.content if b.type == "tool_use")
    assert m.stop_reason == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}
