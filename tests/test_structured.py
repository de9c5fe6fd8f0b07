"""generate(..., json_schema=...): the reply parses and validates, whatever the sampler draws."""

from __future__ import annotations

import json

import jsonschema
import pytest

from qwen2_mlx.generation.generate import generate
from qwen2_mlx.generation.structured import StructuredOutputError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_replies_validate_against_the_schema(mt, seed):
    reply = generate(*mt, "hello", 80, json_schema=SCHEMA, temperature=1.0, seed=seed)
    assert reply.finish_reason == "stop"  # the grammar ends the turn right after the value
    jsonschema.validate(json.loads(reply), SCHEMA)


def test_a_schema_as_a_string_and_any_object(mt):
    reply = generate(
        *mt,
        "hello",
        60,
        json_schema=json.dumps(
            {"type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False}
        ),
    )
    assert json.loads(reply)["x"] in (1, 2)
    assert generate(*mt, "hello", 30, json_schema=True).startswith("{")


def test_without_a_schema_the_reply_is_unchanged(mt):
    assert generate(*mt, "hello", 12, json_schema=None) == generate(*mt, "hello", 12)


@pytest.mark.parametrize(
    "schema,words",
    [
        ({"type": "nosuch"}, "nosuch"),
        ("{not json", "not valid JSON"),
        ([1, 2], "object"),
        ({"$ref": "#/missing"}, "missing"),
    ],
)
def test_rejected_schemas_raise_naming_the_problem(mt, schema, words):
    with pytest.raises(StructuredOutputError, match=words):
        generate(*mt, "hello", 5, json_schema=schema)


def test_not_with_speculative_decoding(mt):
    with pytest.raises(ValueError, match="speculative"):
        generate(*mt, "hello", 5, json_schema=True, lookup=True)
