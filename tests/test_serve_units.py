"""The server's pure-Python pieces: tool-call splitting, message conversion, validation, the CLI."""

from __future__ import annotations

import pytest

from qwen2_mlx.serve.anthropic_api import parse_messages
from qwen2_mlx.serve.openai_api import parse_chat, parse_completion
from qwen2_mlx.serve.protocol import APIError
from qwen2_mlx.serve.tools import ToolCallSplitter


def feed_all(splitter, pieces):
    shown = "".join(splitter.feed(p) for p in pieces)
    rest, calls = splitter.finish()
    return shown, rest, calls


def test_tagged_calls_are_held_back_and_parsed_across_pieces():
    pieces = [
        "Let me check.",
        " <tool",
        '_call>\n{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}\n</tool_call>',
    ]
    shown, rest, calls = feed_all(ToolCallSplitter(["get_weather"]), pieces)
    assert shown == "Let me check. " and rest == ""
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and calls[0].arguments_json == '{"city": "Paris"}'


def test_two_calls_and_a_broken_block_stays_text():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
    text += '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>'
    _, rest, calls = feed_all(ToolCallSplitter(["a", "b"]), [text])
    assert [c.name for c in calls] == ["a", "b"] and rest == ""
    _, rest, calls = feed_all(ToolCallSplitter(["a"]), ["ok <tool_call>{broken</tool_call>"])
    assert calls == [] and rest == "<tool_call>{broken</tool_call>"


def test_a_partial_tag_at_the_end_is_released_when_no_call_follows():
    s = ToolCallSplitter(["a"])
    assert s.feed("x <tool") == "x "
    assert s.feed(" box") == "<tool box"
    assert s.finish() == ("", [])


def test_bare_and_fenced_json_calls_of_offered_tools():
    fenced = '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
    shown, rest, calls = feed_all(ToolCallSplitter(["get_weather"]), [fenced[:5], fenced[5:]])
    assert shown == "" and rest == "" and calls[0].arguments == {"city": "Paris"}
    # JSON that is not a call of an offered tool is released as text, whole
    other = '```json\n{"name": "rm_rf", "arguments": {}}\n```'
    shown, rest, calls = feed_all(ToolCallSplitter(["get_weather"]), [other])
    assert calls == [] and shown + rest == other
    # without tools nothing is held
    assert ToolCallSplitter().feed("{1}") == "{1}"


def test_openai_messages_become_template_messages():
    spec = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "kind."}]},
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "1", "type": "function", "function": {"name": "w", "arguments": '{"c": 1}'}}],
                },
                {"role": "tool", "content": "sunny", "tool_call_id": "1"},
            ],
            "max_completion_tokens": 7,
            "stop": "END",
        }
    )
    assert spec.messages[0] == {"role": "system", "content": "Be kind."}
    assert spec.messages[2]["tool_calls"][0]["function"] == {"name": "w", "arguments": {"c": 1}}
    assert spec.messages[3] == {"role": "tool", "content": "sunny"}
    assert spec.max_tokens == 7 and spec.stop == ["END"]


def test_anthropic_blocks_become_template_messages():
    spec = parse_messages(
        {
            "model": "m",
            "max_tokens": 5,
            "system": [{"type": "text", "text": "Sys."}],
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "t", "name": "w", "input": {"c": 1}},
                    ],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "sunny"}]},
            ],
            "tools": [{"name": "w", "description": "weather", "input_schema": {"type": "object"}}],
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
        }
    )
    assert [m["role"] for m in spec.messages] == ["system", "user", "assistant", "tool"]
    assert spec.messages[2]["tool_calls"][0]["function"] == {"name": "w", "arguments": {"c": 1}}
    assert spec.tools[0]["function"]["parameters"] == {"type": "object"}
    assert spec.schema == {"type": "object"}


@pytest.mark.parametrize(
    "body,words",
    [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "text only"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 2}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0]"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ],
)
def test_openai_validation_names_the_field(body, words):
    with pytest.raises(APIError) as e:
        parse_chat(body)
    assert e.value.status == 400 and words in e.value.message


def test_completion_prompt_forms():
    assert parse_completion({"prompt": "hi"}).prompt == "hi"
    assert parse_completion({"prompt": [[1, 2, 3]]}).prompt == [1, 2, 3]
    for bad in ({"prompt": ""}, {"prompt": ["a", "b"]}, {"prompt": [1, "x"]}, {}):
        with pytest.raises(APIError):
            parse_completion(bad)


def test_cli_argument_errors_exit_2(capsys, tmp_path):
    from qwen2_mlx.serve.cli import main

    for argv in (["--max-concurrency", "0"], ["--prompt-cache-bytes", "lots"], ["--lookup", "--draft-model", "x"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert main(["--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
