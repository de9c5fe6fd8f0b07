"""Structured output: a logits processor that keeps sampling inside a JSON schema (llguidance).

`json_schema_processor(tokenizer, schema, vocab_size)` compiles the schema with llguidance (a kept
grammar library; `pip install qwen2-mlx[serve]`), and returns a processor of mlx-lm's signature
`proc(tokens, logits) -> logits` that sets every token the grammar forbids to -inf. Once the JSON
is complete only end-of-turn tokens remain allowed, so the reply ends right after it.

llguidance's own MLX helper is a Metal kernel; the mask here is applied with `mx.where` so it runs
on every MLX backend. The processor consumes the tokens sampled since its previous call (it reads
them from `tokens`, the prompt and reply so far), so it works under `generate_step` and mlx-lm's
`BatchGenerator` alike, one processor per sequence.
"""

from __future__ import annotations

import json
from typing import Union

import mlx.core as mx
import numpy as np


class StructuredOutputError(ValueError):
    """A JSON schema the grammar library rejects; the message says what is wrong."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # the optional `serve` extra
        raise StructuredOutputError(
            "structured output needs the llguidance package: pip install 'qwen2-mlx[serve]'"
        ) from e
    return llguidance


_TOKENIZERS: dict = {}


def ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's tokenizer for ours (built once per tokenizer: it takes about a second)."""
    llg = _llguidance()
    inner = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper around ours
    key = (id(inner), vocab_size)
    if key not in _TOKENIZERS:
        backend = getattr(inner, "_tok", None)  # our Tokenizer keeps the `tokenizers` object here
        if backend is None:
            raise StructuredOutputError("structured output needs a tokenizer built on the `tokenizers` library")
        eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [])
        _TOKENIZERS[key] = llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos or None)
    return _TOKENIZERS[key]


def compile_json_schema(schema: Union[dict, str, bool, None]) -> str:
    """llguidance's grammar for a JSON schema (None or `{}`: any JSON object)."""
    llg = _llguidance()
    if schema is None:
        schema = {"type": "object"}
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(f"the schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise StructuredOutputError(f"a JSON schema is an object, got {type(schema).__name__}")
    try:
        # Compact separators: a small model given free whitespace can loop on newlines.
        grammar = llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        )
    except (ValueError, TypeError) as e:
        raise StructuredOutputError(f"invalid JSON schema: {e}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise StructuredOutputError(f"unsupported JSON schema: {messages[0] if messages else 'rejected'}")
    return grammar


class GrammarProcessor:
    """mlx-lm logits processor: masks the logits to what the grammar allows next."""

    def __init__(self, tokenizer, grammar: str, vocab_size: int):
        llg = _llguidance()
        self.matcher = llg.LLMatcher(ll_tokenizer(tokenizer, vocab_size), grammar)
        if self.matcher.is_error():
            raise StructuredOutputError(f"unsupported JSON schema: {self.matcher.get_error()}")
        self.vocab_size = vocab_size
        self._seen = None  # length of `tokens` at the previous call
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        n = int(tokens.size) if tokens is not None else 0
        # Once the value is complete the matcher takes nothing but end-of-turn, which double-buffered
        # decoding may feed it before the caller has read it: the mask stays end-of-turn only.
        if self._seen is not None and n > self._seen and not self.matcher.is_stopped():
            new = tokens.reshape(-1)[self._seen :].tolist()
            if not self.matcher.consume_tokens(new):
                raise StructuredOutputError(f"the grammar refused a sampled token: {self.matcher.get_error()}")
        self._seen = n
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: logits.shape[-1]].astype(bool)
        if allowed.size < logits.shape[-1]:
            allowed = np.pad(allowed, (0, logits.shape[-1] - allowed.size))
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))

    @property
    def done(self) -> bool:
        """The value is complete (only end-of-turn may follow)."""
        return self.matcher.is_stopped() or self.matcher.is_accepting()


def json_schema_processor(tokenizer, schema: Union[dict, str, bool, None], vocab_size: int) -> GrammarProcessor:
    """A logits processor keeping the reply inside `schema` (None: any JSON object)."""
    return GrammarProcessor(tokenizer, compile_json_schema(schema), vocab_size)
