"""The status bar: model state or load progress, the last reply's speed, and the context meter."""

from __future__ import annotations

from typing import Optional

from textual.containers import Horizontal
from textual.widgets import Label

WARN_AT = 0.8  # context share at which the meter turns to a warning


def bar(fraction: float, width: int = 12) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(fraction * width)
    return "█" * full + "░" * (width - full)


# Below this many new prompt tokens (a regenerate, a follow-up read from the cache) a rate says
# nothing: 2 tokens in a second would show as "prompt 2 t/s".
PROMPT_RATE_MIN = 16


def stats_text(stats) -> str:
    """Time to first token, prompt and generation speed, peak memory (fields of engine.Stats); with
    speculative decoding, the share of proposed tokens accepted and tokens per forward pass."""
    if not stats.generation_tokens:
        return ""
    if getattr(stats, "server", False):
        return server_stats_text(stats)
    prompt = (
        f"prompt {stats.prompt_tps:.0f} t/s"
        if stats.prompt_tokens >= PROMPT_RATE_MIN
        else f"prompt {stats.prompt_tokens} new tok"
    )
    text = (
        f"TTFT {stats.time_to_first_token:.2f}s · {prompt} · "
        f"gen {stats.generation_tps:.1f} t/s · {stats.peak_memory:.2f} GB"
    )
    if getattr(stats, "forward_passes", 0):  # speculative decoding ran: how well it guessed
        text += f" · accept {stats.acceptance_rate:.0%} · {stats.tokens_per_forward:.1f} t/fwd"
    return text


def server_stats_text(stats) -> str:
    """A server's reply: time to first token and generation speed timed here, token counts from its
    `usage` (the prompt's with the part its prefix cache supplied); no memory figure, it is not ours."""
    text = f"TTFT {stats.time_to_first_token:.2f}s"
    if stats.prompt_tokens:
        text += f" · prompt {stats.prompt_tokens:,} tok ({stats.cached_tokens:,} cached)"
    if stats.generation_tps:
        text += f" · gen {stats.generation_tps:.1f} t/s"
    return text + " · server"


class StatusBar(Horizontal):
    state = "starting…"
    note = ""  # a line about the chat's cache on disk, shown after the state until the next reply

    def compose(self):
        yield Label("starting…", id="status-state")
        yield Label("", id="status-stats")
        yield Label("", id="status-context")

    def set_state(self, text: str) -> None:
        self.state = text
        self.query_one("#status-state", Label).update(f"{text} · {self.note}" if self.note else text)

    def set_note(self, text: str, warning: bool = False) -> None:
        self.note = text
        self.query_one("#status-state", Label).set_class(bool(text) and warning, "-warn")
        self.set_state(self.state)

    def set_loading(self, fraction: float, text: str) -> None:
        self.note = ""
        self.set_state(f"Loading model {bar(fraction)} {fraction:4.0%}  {text}")

    def set_stats(self, stats) -> None:
        """The figures of the reply being written or last written (`stats_text`); None clears them."""
        self.query_one("#status-stats", Label).update(stats_text(stats) if stats is not None else "")

    def set_context(self, used: Optional[int], limit: int) -> None:
        """The meter; `used` None is unknown (a server's model before its first `usage`)."""
        label = self.query_one("#status-context", Label)
        if used is None:
            label.update(f"ctx —/{limit:,}" if limit else "ctx —")
            limit = 0
        elif not limit:
            label.update("")
        else:
            share = used / limit
            label.update(f"ctx {used:,}/{limit:,} {share:.0%}" + (" ⚠" if share >= WARN_AT else ""))
        label.set_class(bool(limit) and used / limit >= WARN_AT, "-warn")
        label.set_class(bool(limit) and used / limit >= 1.0, "-full")
