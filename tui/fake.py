"""A scripted stand-in for the model, for tests, screenshots and working on the UI without weights.

It streams fixed replies token by token with a delay, reports fixed statistics (so snapshots are
deterministic) and can be told to fail, so every path of the app can be driven without MLX.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional, Union

from qwen2_mlx.generation.reading_time import ReadingSpeed

from .backend import DEFAULT_SETTINGS


@dataclass
class FakeResponse:
    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    time_to_first_token: float
    finish_reason: Optional[str] = None
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    forward_passes: int = 0


def split_tokens(text: str) -> list[str]:
    """Cut text into word-ish pieces (each CJK character alone), roughly like a BPE tokenizer."""
    return re.findall(
        r"\s*[\u3040-\u30ff\u3400-\u9fff\uff00-\uffef]|\s*[^\s\u3040-\u30ff\u3400-\u9fff\uff00-\uffef]+|\s+", text
    )


Reply = Union[str, Callable[[str], str]]


class ContextOverflowError(ValueError):
    """Raised like qwen2_mlx's: the conversation does not fit and the policy is "refuse"."""


class FakeBackend:
    """Replies from a script: `replies` is a list used in turn (then the last repeats), or a function
    of the user's text. A reply containing `fail_marker` in the prompt raises instead."""

    def __init__(
        self,
        replies: Optional[list[Reply]] = None,
        delay: float = 0.0,
        load_delay: float = 0.0,
        context_limit: int = 4096,
        name: str = "fake-model",
        fail_on: str = "FAIL",
        load_error: Optional[str] = None,
        load_gate: Optional[threading.Event] = None,
    ):
        self.replies = list(replies or ["Hello! **How** can I help?"])
        self.delay = delay
        self.load_delay = load_delay
        self.context_limit = context_limit
        self.name = name
        self.fail_on = fail_on
        self.load_error = load_error
        self.load_gate = load_gate  # when given, loading waits for it (tests of the loading state)
        self.context_used = 0
        self.last_reply: Optional[str] = None
        self.calls: list[dict] = []
        self.prefill_progress: Optional[Callable[[int, int], None]] = None
        self.defaults = dict(DEFAULT_SETTINGS)

    def load(self, progress: Callable[[float, str], None]) -> None:
        for i in range(1, 5):
            time.sleep(self.load_delay / 4)
            progress(i / 4, f"loading weights {i}/4")
        if self.load_gate is not None:
            self.load_gate.wait(30)
        if self.load_error:
            raise RuntimeError(self.load_error)

    def _reply_for(self, text: str) -> str:
        idx = min(len(self.calls) - 1, len(self.replies) - 1)
        r = self.replies[idx]
        return r(text) if callable(r) else r

    def measure_prefill(self) -> ReadingSpeed:
        """A fixed reading speed (500 tokens/s at any length), as ModelBackend measures one."""
        return ReadingSpeed(1 / 500)

    def count_tokens(self, history, system) -> int:
        return sum(len(split_tokens(m["content"])) + 4 for m in history) + (len(split_tokens(system)) if system else 0)

    def generate(self, history, system, settings, cancel: threading.Event) -> Iterator[FakeResponse]:
        user = history[-1]["content"]
        self.calls.append({"history": history, "system": system, "settings": dict(settings)})
        self.last_reply = None
        if self.fail_on and self.fail_on in user:
            time.sleep(self.delay)
            raise RuntimeError("the model failed (scripted)")
        tokens = split_tokens(self._reply_for(user))
        prompt = self.count_tokens(history, system)
        max_tokens = settings.get("max_tokens")
        room = self.context_limit - prompt
        if room <= 0 and settings.get("context_policy", "refuse") == "refuse":
            raise ContextOverflowError(
                f"the conversation needs {prompt} tokens, more than the context "
                f"window of {self.context_limit} tokens allows"
            )
        n, out, reason = 0, [], "stop"
        if self.prefill_progress is not None:  # report reading in two steps, as a chunked prefill does
            for done in (prompt // 2, prompt):
                self.prefill_progress(done, prompt)

        def resp(text, reason=None):
            # With lookup on, fixed figures as if every other token had been a kept proposal.
            spec = (n, n // 2, n - n // 2) if settings.get("lookup") else (0, 0, 0)
            return FakeResponse(text, n, prompt, 120.0, n, 30.0, 0.5, 0.25, reason, *spec)

        for tok in tokens:
            if cancel.is_set():
                reason = "cancelled"
                break
            if max_tokens is not None and n >= max_tokens:
                reason = "length"
                break
            if n >= room:
                reason = "context"
                break
            time.sleep(self.delay)
            n += 1
            out.append(tok)
            yield resp(tok)
        self.context_used = prompt + n
        self.last_reply = "".join(out)
        yield resp("", reason)
