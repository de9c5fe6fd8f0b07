"""Line breaking that lets Chinese, Japanese and Korean text wrap between characters.

Rich and Textual break lines only at spaces, so a CJK sentence (which has none) moves whole to
the next line and leaves a short line behind ("Python" alone, then the Chinese). Following
UAX #14 in its simplest form, every CJK character is a break opportunity, except that closing
punctuation (。，」…) never starts a line and opening punctuation (「（) never ends one.
`install()` swaps the word splitters of Rich (used by Static, Markdown) and Textual (used by
TextArea) for these; the wrap algorithms themselves are unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

CJK = (
    "\u1100-\u11ff\u2e80-\u2fdf\u2ff0-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff"
    "\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003ffff"
)
NO_START = (
    "、。，．：；？！）］｝」』】〕〉》〙〗〟’”…‥ー々ゝゞヽヾぁぃぅぇぉっゃゅょゎァィゥェォッャュョヮヵヶ・,.!?;:%)]}"
)
NO_END = "（［｛「『【〔〈《〘〖〝‘“"

_unit = f"(?:[{re.escape(NO_END)}]*[{CJK}][{re.escape(NO_START)}]*|[^\\s{CJK}]+[{re.escape(NO_START)}]*)"
re_word = re.compile(rf"\s*{_unit}\s*")  # Rich's shape: leading and trailing whitespace
re_chunk = re.compile(rf"{_unit}\s*|\s+")  # Textual's shape: trailing whitespace only


def words(text: str) -> Iterable[tuple[int, int, str]]:
    """rich._wrap.words, with each CJK character a word of its own."""
    position = 0
    match = re_word.match(text, position)
    while match is not None:
        start, end = match.span()
        yield start, end, match.group(0)
        match = re_word.match(text, end)


def chunks(text: str) -> Iterable[tuple[int, int, str]]:
    """textual._wrap.chunks, with each CJK character a chunk of its own."""
    end = 0
    while (match := re_chunk.match(text, end)) is not None:
        start, end = match.span()
        yield start, end, match.group(0)


def install() -> bool:
    """Use the CJK-aware splitters; returns False (changing nothing) if Rich or Textual moved them."""
    try:
        import rich._wrap as rich_wrap
        import textual._wrap as textual_wrap
    except ImportError:
        return False
    if not (callable(getattr(rich_wrap, "words", None)) and callable(getattr(textual_wrap, "chunks", None))):
        return False
    rich_wrap.words = words
    textual_wrap.chunks = chunks
    return True
