"""Reading a request body: bounded in size, strict JSON, bounded in depth, valid Unicode only.

Everything here runs before a field is looked at, so the API validators (schemas.py) see a plain
JSON object whose cost is already bounded: at most `max_bytes` bytes (413 past that, read no
further), no NaN/Infinity literals (JSON has none; Python's parser accepts them), no integer
literal longer than Python parses (its 4,300-digit limit), at most `MAX_DEPTH` nested arrays and
objects, and no string or key holding a lone surrogate (`"\\ud800"` parses, but no tokenizer can
encode it). Each refusal is an APIError naming what is wrong, never the parser's internal text.
"""

from __future__ import annotations

import json
from typing import Any

from .protocol import APIError, bad

MAX_DEPTH = 64  # far beyond any real request (messages > content parts > tool arguments > ...)
DEFAULT_MAX_BODY_BYTES = 4 << 20


def _no_constant(name: str):
    raise bad(f"the request body is not valid JSON: {name} is not a JSON number")


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or APIError(400) saying why not."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except APIError:
        raise
    except json.JSONDecodeError as e:
        raise bad(f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise bad("the request body is not valid UTF-8") from None
    except RecursionError:
        raise bad(f"the request body nests arrays and objects more than {MAX_DEPTH} deep") from None
    except ValueError:  # int() past sys.get_int_max_str_digits
        raise bad("the request body holds a number literal too long to be a number of this API") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    check_tree(body)
    return body


def check_tree(body: Any) -> None:
    """Depth and Unicode of every value, walked without recursion; the error names the field."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, where)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            raise bad(f"the request body nests arrays and objects more than {MAX_DEPTH} deep (at {where})")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            if isinstance(k, str):
                _check_text(k, f"{where}.{k[:40]}" if where else k[:40])
            stack.append((v, f"{where}.{k}" if where else str(k), depth + 1))


def _check_text(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        field = where.split(".")[0] if where else None
        raise bad(
            f"{where or 'a key'}: the string is not valid Unicode (a lone surrogate at character {e.start})", field
        ) from None


async def read_body(receive_chunks, declared: Any, max_bytes: int) -> bytes:
    """Read the body from an async iterator of chunks, refusing (413) past `max_bytes` bytes.

    `declared` is the Content-Length header (or None): a body announced as too large is refused
    before a byte of it is read.
    """
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise too_large(max_bytes)
        except ValueError:
            raise bad("the Content-Length header is not a number") from None
    parts, size = [], 0
    async for chunk in receive_chunks:
        size += len(chunk)
        if size > max_bytes:
            raise too_large(max_bytes)
        parts.append(chunk)
    return b"".join(parts)


def too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server accepts ({max_bytes:,} bytes; see --max-body-bytes)",
        "request_too_large",
    )
