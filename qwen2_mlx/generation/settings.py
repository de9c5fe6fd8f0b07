"""`GenerationSettings`: every setting a generation takes, in one frozen object checked in one place.

`stream_generate`, `generate`, `batch_generate` and `Chat` all read their settings from it; their
mlx-lm keyword names (`temperature=`, `temp=`, `top_p=`, `max_tokens=`, ...) are built into one at
the edge (`GenerationSettings.build`), so a new setting is added here and nowhere else. A bad value
is a ValueError (a TypeError for a wrong type or an unknown name) that names the field.
Plain Python: front ends build settings before MLX is imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Optional

DEFAULT_PREFILL_STEP_SIZE = 2048
KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize supports; the chat app offers 4 and 8
KV_GROUP_SIZES = (32, 64, 128)

# The settings a saved chat keeps (plain values, written to its JSON file); the others are a
# turn's or a chat's objects (samplers, models) or belong to the chat itself (KV cache, draft model).
SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "repetition_context_size",
    "logit_bias",
    "max_tokens",
    "seed",
    "stop",
)
KV_KEYS = ("kv_bits", "kv_group_size", "quantized_kv_start", "memory_budget")
ALIASES = {"temp": "temperature"}  # mlx-lm's spelling
# Settings that belong to a chat, not to one of its turns: its caches are built with them, or its window.
CHAT_KEYS = ("draft_model", "num_draft_tokens", "max_context", *KV_KEYS)


def _number(name: str, value: Any, low: float, high: Optional[float] = None, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, not {value!r}")
    if value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {span}, not {value!r}")


def check_kv(kv_bits: Any, kv_group_size: int, quantized_kv_start: int, memory_budget: Any = None) -> None:
    """mlx-lm's KV-cache quantization settings, each refused with its name (nothing to check without bits).

    `kv_bits="auto"` (kv_budget.py) quantizes to 8 bits once the float cache would pass `memory_budget`."""
    if memory_budget is not None:
        from .kv_budget import parse_size

        parse_size(memory_budget)
    if kv_bits is None:
        return
    if isinstance(kv_bits, bool) or (kv_bits not in KV_BITS and kv_bits != "auto"):
        raise ValueError(f"kv_bits must be one of {KV_BITS}, 'auto' (or None for a float cache), not {kv_bits!r}")
    if isinstance(kv_group_size, bool) or kv_group_size not in KV_GROUP_SIZES:
        raise ValueError(f"kv_group_size must be one of {KV_GROUP_SIZES}, not {kv_group_size!r}")
    if isinstance(quantized_kv_start, bool) or not isinstance(quantized_kv_start, int) or quantized_kv_start < 0:
        raise ValueError(f"quantized_kv_start must be a non-negative integer, not {quantized_kv_start!r}")


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate: sampling, stopping, speculative decoding, KV-cache quantization, structured output.

    Sampling (mlx-lm's `make_sampler`/`make_logits_processors`): `temperature` 0 is greedy; `sampler`
    and `logits_processors` replace or extend what the numbers build. Stopping: `max_tokens` (None,
    or a negative value as in mlx-lm: until the end of the turn or the context window), `stop`
    strings, `max_context` (a narrower window than the model's). Speculative decoding: `draft_model`
    with `num_draft_tokens`, or `lookup` (True, a dict or `LookupSettings`) for prompt lookup.
    KV cache: `kv_bits` (None: float), `kv_group_size`, `quantized_kv_start`, mlx-lm's names; `kv_bits="auto"`
    switches to 8 bits once the float cache would pass `memory_budget` (bytes or "4GB"; default: the device's).
    Structured output: `json_schema` (a dict, a JSON string, or True for any JSON object).
    """

    # sampling
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    logit_bias: Optional[Mapping[int, float]] = None
    seed: Optional[int] = None
    sampler: Optional[Callable] = None
    logits_processors: Optional[Sequence[Callable]] = None
    # stopping
    max_tokens: Optional[int] = 256
    stop: tuple[str, ...] = ()
    max_context: Optional[int] = None
    # prefill
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE
    # speculative decoding
    draft_model: Any = None
    num_draft_tokens: int = 3
    lookup: Any = None  # None/False, True, a dict or LookupSettings; `lookup_settings` is the checked form
    # KV-cache quantization
    kv_bits: Optional[Any] = None  # bits, "auto" or None
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    memory_budget: Any = None  # for kv_bits="auto": bytes or a size string
    # structured output
    json_schema: Any = None

    def __post_init__(self) -> None:
        self._check_sampling()
        self._check_stopping()
        self._check_speculative()
        self._check_kv()

    def _check_sampling(self) -> None:
        _number("temperature", self.temperature, 0.0)
        _number("top_p", self.top_p, 0.0, 1.0)
        _number("top_k", self.top_k, 0, integer=True)
        _number("min_p", self.min_p, 0.0, 1.0)
        if self.repetition_penalty is not None:
            _number("repetition_penalty", self.repetition_penalty, 0.0)
        _number("repetition_context_size", self.repetition_context_size, 1, integer=True)
        if self.seed is not None:
            _number("seed", self.seed, 0, integer=True)
        if self.logit_bias is not None and not isinstance(self.logit_bias, Mapping):
            raise TypeError(f"logit_bias must map token ids to numbers, not {self.logit_bias!r}")
        if self.sampler is not None and not callable(self.sampler):
            raise TypeError(f"sampler must be callable, not {self.sampler!r}")

    def _check_stopping(self) -> None:
        if self.max_tokens is not None:
            _number("max_tokens", self.max_tokens, -(1 << 62), integer=True)
            if self.max_tokens == 0:
                raise ValueError("max_tokens must be positive (or None for no limit)")
            if self.max_tokens < 0:  # mlx-lm's "no limit"
                object.__setattr__(self, "max_tokens", None)
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) for s in stop):
            raise TypeError(f"stop must be a string or a list of strings, not {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if self.max_context is not None:
            _number("max_context", self.max_context, 1, integer=True)
        _number("prefill_step_size", self.prefill_step_size, 1, integer=True)

    def _check_speculative(self) -> None:
        n = self.num_draft_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_draft_tokens must be a positive integer (got {self.num_draft_tokens!r})")
        self.lookup_settings  # noqa: B018 (a bad `lookup` fails here, naming its field)
        speculative = self.draft_model is not None or self.lookup_settings is not None
        if self.json_schema is not None and self.json_schema is not False and speculative:
            raise ValueError("json_schema cannot be combined with speculative decoding")

    def _check_kv(self) -> None:
        check_kv(self.kv_bits, self.kv_group_size, self.quantized_kv_start, self.memory_budget)

    # --- views ---------------------------------------------------------------------------------
    @property
    def lookup_settings(self):
        """`lookup` checked: None (off) or a `LookupSettings`."""
        from .proposers import LookupSettings

        return LookupSettings.coerce(self.lookup)

    @property
    def speculative(self) -> bool:
        return self.draft_model is not None or self.lookup_settings is not None

    @property
    def kv(self) -> dict:
        """`kv_bits`, `kv_group_size`, `quantized_kv_start`, `memory_budget` as keyword arguments."""
        return {k: getattr(self, k) for k in KV_KEYS}

    @property
    def sampling(self) -> dict:
        """The plain settings a saved chat keeps (SAMPLING_KEYS), as keyword arguments."""
        return {k: getattr(self, k) for k in SAMPLING_KEYS}

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with `changes` (keyword names as `build` takes them), checked again."""
        return dataclasses.replace(self, **_known(changes))

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def build(cls, settings: Optional[GenerationSettings] = None, **kwargs: Any) -> GenerationSettings:
        """`settings` (or the defaults) with keyword settings on top: the API's edge.

        Keywords are the field names, plus mlx-lm's `temp` for `temperature`; an unknown one is a
        TypeError naming it.
        """
        if settings is not None and not isinstance(settings, GenerationSettings):
            raise TypeError(f"settings must be a GenerationSettings, not {type(settings).__name__}")
        base = settings if settings is not None else cls()
        return base.replace(**kwargs) if kwargs else base


def _known(kwargs: dict) -> dict:
    """Keyword settings with mlx-lm's aliases resolved; an unknown name is a TypeError naming it."""
    out = {}
    names = GenerationSettings.names()
    for key, value in kwargs.items():
        name = ALIASES.get(key, key)
        if name not in names:
            raise TypeError(f"unknown generation setting {key!r} (known: {', '.join(names)})")
        out[name] = value
    return out


def turn_settings(record: dict) -> dict:
    """The keyword settings of one chat turn in a front end's settings `record` (a dict of plain values).

    Keys that are not settings (a context policy, an app option) and the chat's own (CHAT_KEYS) are
    left out, and None means "the default", except for `max_tokens`, where None means no limit.
    """
    names = GenerationSettings.names()
    kw = {k: v for k, v in record.items() if k in names and k not in CHAT_KEYS and v is not None}
    if "max_tokens" in record:
        kw["max_tokens"] = record["max_tokens"]
    return kw
