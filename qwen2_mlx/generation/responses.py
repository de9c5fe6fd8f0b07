"""What generation returns: streamed responses, a finished reply's figures, and its errors.

Plain Python (no MLX import), so the chat app and other front ends can name these types before a
model is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import mlx.core as mx

FINISH_REASONS = ("stop", "length", "context", "cancelled")


class ContextOverflowError(ValueError):
    """The prompt does not fit the model's context window (nothing is truncated silently)."""


@dataclass
class GenerationResponse:
    """One streamed step; the fields of mlx-lm's GenerationResponse plus time to first token."""

    text: str
    token: int
    logprobs: Optional[mx.array]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None
    from_draft: bool = False
    time_to_first_token: float = 0.0
    # Speculative decoding (all 0 without it): tokens proposed, proposals kept, model forwards.
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    forward_passes: int = 0


@dataclass
class GenerationStats:
    """The figures of a finished generation (those mlx-lm prints, plus time to first token)."""

    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    time_to_first_token: float = 0.0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    forward_passes: int = 0

    @property
    def speculative(self) -> bool:
        """Whether speculative decoding ran (prompt lookup or a draft model)."""
        return self.forward_passes > 0

    @property
    def acceptance_rate(self) -> float:
        """Proposed tokens the model kept (0 when nothing was proposed)."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward pass of the model (1.0 for plain decoding)."""
        return self.generation_tokens / self.forward_passes if self.forward_passes else 1.0

    @classmethod
    def from_response(cls, r: Optional[GenerationResponse]) -> GenerationStats:
        if r is None:
            return cls()
        return cls(**{f.name: getattr(r, f.name, f.default) for f in fields(cls)})

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> GenerationStats:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


class Reply(str):
    """A finished reply: the text itself (a `str`), with `.finish_reason` and `.stats`.

    Jupyter renders it as Markdown; a reply that did not end by itself says why below the text.
    """

    finish_reason: Optional[str]
    stats: GenerationStats

    def __new__(cls, text: str, finish_reason: Optional[str] = None, stats: Optional[GenerationStats] = None):
        obj = super().__new__(cls, text)
        obj.finish_reason = finish_reason
        obj.stats = stats or GenerationStats()
        return obj

    _NOTES = {
        "length": "stopped at max_tokens",
        "context": "stopped: the context window is full",
        "cancelled": "cancelled",
    }

    def _repr_markdown_(self) -> str:
        note = self._NOTES.get(self.finish_reason)
        return str(self) + (f"\n\n*[{note}]*" if note else "")
