"""The request shapes of both APIs, declared once with their types and ranges (pydantic).

Each model lists the fields its API reads, strictly typed (no "5" for 5, no true for 1), with
finite numbers only and every integer bounded: token counts fit 31 bits, `seed` is OpenAI's
signed 64-bit integer (normalized to the unsigned key MLX draws from), `top_logprobs` is 0..20.
Fields whose inner structure the template reads (messages, tools, response formats) are typed as
lists and objects here and checked part by part in openai_api.py / anthropic_api.py; unknown
fields are ignored, as both APIs' clients send extras. `validate` turns pydantic's first error
into one APIError(400) naming the field, in words a client can act on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .protocol import APIError, Sampling, bad, type_name

TokenCount = Annotated[int, Field(ge=1, le=2**31 - 1)]
Unit = Annotated[float, Field(ge=0, le=1)]
TopK = Annotated[int, Field(ge=0, le=2**31 - 1)]  # past the vocabulary it filters nothing (clamped later)
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # OpenAI: a signed 64-bit integer
Stop = Union[str, Annotated[list[str], Field(max_length=64)]]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Request):
    include_usage: Optional[bool] = None


class _OpenAI(_Request):
    model: Optional[str] = None
    max_tokens: Optional[TokenCount] = None
    max_completion_tokens: Optional[TokenCount] = None
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    top_p: Optional[Unit] = None
    top_k: Optional[TopK] = None  # not OpenAI's, but its compatible servers (vLLM, mlx-lm) take it
    min_p: Optional[Unit] = None
    seed: Optional[Seed] = None
    n: Optional[Literal[1]] = None  # one choice per request
    stop: Optional[Stop] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None

    def sampling(self) -> Sampling:
        return Sampling(
            temperature=_or(self.temperature, 1.0),
            top_p=_or(self.top_p, 1.0),
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=None if self.seed is None else self.seed % 2**64,  # -1 is 2**64-1, as two's complement
        )


class ChatRequest(_OpenAI):
    messages: Annotated[list[Any], Field(min_length=1)]
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    response_format: Optional[dict] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None


TokenIds = list[Annotated[int, Field(ge=0, le=2**31 - 1)]]


class CompletionRequest(_OpenAI):
    prompt: Union[str, TokenIds, Annotated[list[Union[str, TokenIds]], Field(min_length=1, max_length=1)]]
    logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None
    echo: Optional[Literal[False]] = None


class MessagesRequest(_Request):
    model: Annotated[str, Field(min_length=1)]
    max_tokens: TokenCount
    messages: Annotated[list[Any], Field(min_length=1)]
    system: Union[str, list[Any], None] = None
    temperature: Optional[Unit] = None
    top_p: Optional[Unit] = None
    top_k: Optional[TopK] = None
    stop_sequences: Optional[Annotated[list[str], Field(max_length=64)]] = None
    stream: Optional[bool] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    output_config: Optional[dict] = None
    output_format: Optional[dict] = None

    def sampling(self) -> Sampling:
        return Sampling(temperature=_or(self.temperature, 1.0), top_p=_or(self.top_p, 1.0), top_k=self.top_k or 0)


def _or(v: Optional[float], default: float) -> float:
    return default if v is None else float(v)


# What a field is, in words, where pydantic's own words would name a union's branches.
SHAPES = {
    "stop": "a string or a list of strings",
    "prompt": "a string or a list of token ids (one prompt per request)",
    "system": "a string or a list of text blocks",
    "messages": "a list of messages",
}
EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
}
SPECIAL = {
    "n": "'n' must be 1: this server returns one choice per request",
    "echo": "'echo' is not supported",
}


def validate(model: type[_Request], body: dict) -> Any:
    """`model` from a request body, or APIError(400) naming the first field that is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise describe(e.errors(include_url=False)[0], body) from None


def describe(err: dict, body: dict) -> APIError:
    loc = [str(p) for p in err["loc"] if isinstance(p, int) or p in _FIELDS or not _branch(p)]
    field = loc[0] if loc else None
    where = ".".join(loc)
    kind = err["type"]
    if field in SPECIAL and kind in ("literal_error",):
        return bad(SPECIAL[field], field)
    if kind == "missing":
        return bad(f"{where}: field required", field)
    if field == "messages" and kind == "too_short" and len(loc) == 1:
        return bad("'messages' must contain at least one message", field)
    if kind in EXPECTED:
        shape = SHAPES.get(field, EXPECTED[kind]) if len(loc) == 1 else EXPECTED[kind]
        return bad(f"'{where}' must be {shape}, got {type_name(err.get('input'))}", field)
    if kind == "finite_number":
        return bad(f"'{where}' must be a finite number", field)
    msg = err["msg"].replace("Input should be", "must be").replace("List should have", "must have")
    return bad(f"'{where}' {msg[0].lower() + msg[1:]}" + _got(err), field)


def _branch(part: Any) -> bool:
    """A loc part naming a union branch or a constrained type (e.g. 'list[str]', 'constrained-int')."""
    return isinstance(part, str) and (
        "[" in part or "-" in part or part in ("str", "int", "float", "bool", "list", "dict")
    )


_FIELDS = {name for m in (ChatRequest, CompletionRequest, MessagesRequest, StreamOptions) for name in m.model_fields}


def _got(err: dict) -> str:
    v = err.get("input")
    return f", got {v}" if isinstance(v, (int, float)) and not isinstance(v, bool) and len(repr(v)) < 40 else ""
