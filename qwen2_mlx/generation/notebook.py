"""Notebook helpers: show a streaming reply in one place that updates as tokens arrive.

In Jupyter the text is one Markdown display, updated in place through its display handle; anywhere
else (a script, a terminal) the chunks are printed as they come. IPython is optional.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any, Optional, TextIO

from .generate import GenerationResponse, GenerationStats, Reply


def _jupyter_display():
    """(display, Markdown) when running inside a Jupyter kernel, else None."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        try:
            import IPython as ipython  # noqa: N813
        except ImportError:
            return None
    shell = ipython.get_ipython() if hasattr(ipython, "get_ipython") else None
    if shell is None or getattr(shell, "kernel", None) is None:
        return None  # plain python or a terminal IPython: a display handle cannot update in place
    from IPython.display import Markdown, display

    return display, Markdown


def display_stream(
    responses: Iterable[GenerationResponse], *, interval: float = 0.1, file: Optional[TextIO] = None
) -> Reply:
    """Consume a stream of responses (stream_generate, Chat.stream, Chat.regenerate) while showing it.

    In Jupyter one Markdown display is updated at most every `interval` seconds and once at the
    end (with a note when the reply was cut short); elsewhere the text is printed to `file`
    (stdout). Returns the whole reply. Interrupting the cell closes the stream, which cancels it.
    """
    jupyter = _jupyter_display() if file is None else None
    out = file or sys.stdout
    parts: list[str] = []
    last: Optional[GenerationResponse] = None
    handle: Any = None
    shown = 0.0
    if jupyter is not None:
        display, Markdown = jupyter
        handle = display(Markdown(""), display_id=True)
    try:
        for last in responses:
            parts.append(last.text)
            if handle is not None:
                now = time.perf_counter()
                if now - shown >= interval:
                    handle.update(Markdown("".join(parts)))
                    shown = now
            elif last.text:
                out.write(last.text)
                out.flush()
    finally:
        close = getattr(responses, "close", None)
        if close is not None:
            close()
    reply = Reply("".join(parts), last.finish_reason if last else "cancelled", GenerationStats.from_response(last))
    if handle is not None:
        handle.update(Markdown(reply._repr_markdown_()))
    else:
        note = Reply._NOTES.get(reply.finish_reason)
        out.write(f"\n[{note}]\n" if note else "\n")
        out.flush()
    return reply


def chat_markdown(messages: list[dict]) -> str:
    """A transcript as Markdown: one bold role line per message, then its text."""
    blocks = []
    for m in messages:
        blocks.append(f"**{m['role']}**\n\n{m['content']}")
    return "\n\n---\n\n".join(blocks)
