"""Export a conversation to Markdown or JSONL (OpenAI `messages` lines) under a readable file name.

File names keep letters and digits of every script (量子计算入门.md, Привет.md), unlike ASCII-only
slugs that turn such titles into an empty name.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Optional

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
MAX_NAME_BYTES = 120  # well under the 255-byte limit of common file systems, leaving room for a suffix


def slugify(title: str, fallback: str = "chat") -> str:
    """A file-name stem from any title: NFC, letters/digits/marks of any script kept, the rest '-'."""
    text = unicodedata.normalize("NFC", title).strip()
    out, dash = [], False
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] in "LNM":
            out.append(ch)
            dash = False
        elif not dash and out:
            out.append("-")
            dash = True
    name = "".join(out).strip("-")
    while len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = name[:-1]
    name = name.rstrip("-")
    return name or fallback


def close_fences(text: str) -> str:
    """`text` with a code fence left open (a reply stopped mid-block) closed, so the next heading stays text."""
    fence = None  # the opening run of ``` or ~~~ while inside a block
    for line in text.splitlines():
        m = FENCE.match(line)
        if m is None:
            continue
        run = m.group(1)
        if fence is None:
            fence = run
        elif run[0] == fence[0] and len(run) >= len(fence) and not line.strip()[len(run) :]:
            fence = None
    return text if fence is None else text.rstrip("\n") + "\n" + fence


def to_markdown(title: str, system: Optional[str], messages: list[dict]) -> str:
    lines = [f"# {title or 'Chat'}", ""]
    if system:
        lines += ["## System", "", system, ""]
    for m in messages:
        lines += [f"## {m['role'].capitalize()}", "", close_fences(m["content"]), ""]
    return "\n".join(lines).rstrip() + "\n"


def to_jsonl(system: Optional[str], messages: list[dict]) -> str:
    rows = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m["role"], "content": m["content"]} for m in messages
    ]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def export_chat(
    title: str,
    system: Optional[str],
    messages: list[dict],
    fmt: str = "md",
    directory: Optional[Path] = None,
    path: Optional[Path] = None,
) -> Path:
    """Write the chat and return the file; never overwrites (adds -2, -3, ... to the name)."""
    if fmt not in ("md", "jsonl"):
        raise ValueError(f"unknown export format {fmt!r}: use md or jsonl")
    body = to_markdown(title, system, messages) if fmt == "md" else to_jsonl(system, messages)
    if path is None:
        directory = Path(directory or Path.cwd())
        stem = slugify(title)
        path = directory / f"{stem}.{fmt}"
        k = 2
        while path.exists():
            path = directory / f"{stem}-{k}.{fmt}"
            k += 1
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(path)
    return path
