"""Haystack prompts: filler text of an exact token length with one needle at a chosen depth.

The prompt is a single user turn rendered with the model's chat template, followed by the start of
the assistant's answer (e.g. "The pass key is"), so a greedy decode of a few tokens is the answer
itself and scoring is an exact match on the digits, as in the passkey test of Landmark Attention /
LongLoRA and RULER's single-needle task.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER = "The pass key is"

NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize them. I will quiz you about the numbers afterwards."
)
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
NIAH_ANSWER = "The special magic number for {key} mentioned in the provided text is"
NIAH_KEYS = (
    "amber-river",
    "silent-harbor",
    "copper-meadow",
    "velvet-summit",
    "crimson-lantern",
    "hollow-pine",
    "golden-orchard",
    "misty-canyon",
    "quiet-glacier",
    "rustic-bridge",
    "wandering-comet",
    "ivory-tower",
)

# A varied, neutral haystack (written for this project) so the needle is not the only sentence that
# differs from its neighbours, unlike the passkey filler; shuffled per seed.
NIAH_FILLER = (
    "The old lighthouse keeper wrote in his logbook every evening before the lamp was lit.",
    "Farmers in the valley rotate their crops to keep the soil rich from one year to the next.",
    "A small bakery on the corner opens at five in the morning and sells out of rye bread by noon.",
    "The committee agreed to postpone the decision until the spring meeting.",
    "Rain fell steadily on the tin roof while the children played cards by the window.",
    "Most of the museum's collection is kept in storage and shown only a few pieces at a time.",
    "The train to the coast stops at every village and takes almost four hours.",
    "She repaired the bicycle chain with a borrowed tool and a little oil.",
    "Bees return to the hive at dusk, guided by the angle of the fading light.",
    "The library extended its opening hours during the examination period.",
    "A narrow path climbs through the forest to a clearing with a view of the lake.",
    "The recipe calls for two cups of flour, a pinch of salt and warm water.",
    "Engineers inspected the bridge after the flood and found only minor damage.",
    "The choir rehearsed the same passage until every voice entered on time.",
    "Fishing boats leave the harbour before sunrise and return with the tide.",
    "An old map in the town hall shows the streets as they were two centuries ago.",
    "The garden was planted with herbs that attract butterflies in late summer.",
    "He kept a jar of buttons on the shelf, sorted by colour and size.",
    "Snow closed the mountain pass for most of the winter that year.",
    "The market square fills with stalls selling cheese, honey and woven baskets.",
    "A gentle wind turned the pages of the newspaper left on the bench.",
    "The teacher asked the class to describe their favourite season in a short essay.",
    "Several species of owl nest in the tall trees at the edge of the park.",
    "The printing press in the basement still works, though it is rarely used.",
    "Travellers often stop at the inn for soup and a place by the fire.",
    "The river widens near the mill, where the water runs slow and shallow.",
    "Students built a model of the solar system out of wire and painted wood.",
    "The clock in the tower has been five minutes fast for as long as anyone remembers.",
    "Wild strawberries grow along the railway embankment in early June.",
    "The orchestra tuned their instruments while the audience found their seats.",
    "A stray cat adopted the bookshop and now sleeps in the window display.",
    "The potter shaped a tall vase and left it to dry in the shade.",
)


@dataclass
class HaystackPrompt:
    """A rendered prompt: token ids, where the needle starts (token index) and the expected answer;
    `user` is the user message the template rendered (what a chat would send)."""

    tokens: list[int]
    needle_token: int
    expected: str
    user: str = ""


def render(tokenizer, user: str, answer_prefix: str) -> str:
    """The user turn through the chat template (plain text if the model has none) plus the answer's start."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = user + "\n\n"
    return text + answer_prefix


def build_haystack_prompt(
    tokenizer,
    length: int,
    depth: float,
    needle: str,
    expected: str,
    units: Sequence[str],
    intro: str,
    question: str,
    answer_prefix: str,
) -> HaystackPrompt:
    """The longest prompt of at most `length` tokens: filler units cycled, the needle after a `depth`
    fraction (0..1) of them. Raises ValueError when even an empty haystack does not fit."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within 0..1, got {depth}")

    def parts(n: int) -> tuple[str, str]:
        filler = [units[i % len(units)] for i in range(n)]
        at = round(depth * n)
        before = intro + "\n\n" + " ".join(filler[:at] + [""])
        after = " ".join([""] + filler[at:]).rstrip() + "\n\n" + question
        return before, after

    def encode(n: int) -> list[int]:
        before, after = parts(n)
        return tokenizer.encode(render(tokenizer, before + needle + after, answer_prefix), add_special_tokens=False)

    base = len(encode(0))
    if base > length:
        raise ValueError(f"length {length} is too short: the question and needle alone take {base} tokens")
    # Binary search on the number of filler units: token counts grow monotonically with it.
    per_unit = max(1, min(len(tokenizer.encode(" " + u, add_special_tokens=False)) for u in units))
    lo, hi = 0, (length - base) // per_unit + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    tokens = encode(lo)
    before, after = parts(lo)
    prefix = render(tokenizer, before, "")
    # The template may add text after the user turn; the needle's start is the length of what precedes it.
    needle_token = (
        len(tokenizer.encode(prefix[: prefix.rindex(before) + len(before)], add_special_tokens=False))
        if before in prefix
        else 0
    )
    return HaystackPrompt(tokens, needle_token, expected, before + needle + after)


def passkey_prompt(
    tokenizer, length: int, depth: float, key: str, answer_prefix: str = PASSKEY_ANSWER
) -> HaystackPrompt:
    """The pass-key prompt; `answer_prefix=""` gives the prompt a chat sends for the same user message."""
    return build_haystack_prompt(
        tokenizer,
        length,
        depth,
        PASSKEY_NEEDLE.format(key=key),
        key,
        [PASSKEY_FILLER],
        PASSKEY_INTRO,
        PASSKEY_QUESTION,
        answer_prefix,
    )


def niah_prompt(
    tokenizer, length: int, depth: float, seed: int, haystack: Optional[Sequence[str]] = None, key: Optional[str] = None
) -> HaystackPrompt:
    """One needle-in-a-haystack cell: the key (unless given), the 7-digit value and the filler order come
    from `seed`."""
    rng = random.Random(seed)
    key = rng.choice(NIAH_KEYS) if key is None else key
    value = str(rng.randint(1_000_000, 9_999_999))
    units = list(haystack or NIAH_FILLER)
    if haystack is None:
        rng.shuffle(units)
    return build_haystack_prompt(
        tokenizer,
        length,
        depth,
        NIAH_NEEDLE.format(key=key, value=value),
        value,
        units,
        NIAH_INTRO,
        NIAH_QUESTION.format(key=key),
        NIAH_ANSWER.format(key=key),
    )


def random_key(seed: int, trial: int) -> str:
    """The 5-digit pass key of one trial; stable across runs so a resumed run asks the same questions."""
    return str(random.Random(f"passkey:{seed}:{trial}").randint(10_000, 99_999))


def first_number(text: str) -> str:
    m = re.search(r"\d+", text.replace(",", ""))
    return m.group(0) if m else ""


def split_sentences(text: str) -> list[str]:
    """Filler units from a user's haystack file: sentences, whitespace normalised."""
    text = " ".join(text.split())
    units = [s.strip() for s in re.split(r"(?<=[.!?。！？])\s+", text) if s.strip()]
    return units
