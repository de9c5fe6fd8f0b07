"""The model behind the chat app: `ModelBackend` loads a converted model and generates replies.

`Backend` is the interface the generation thread (`engine.Engine`) drives; `ModelBackend` is the
real one, over `qwen2_mlx.generation.chat.Chat`, and `fake.FakeBackend` the scripted one for tests.
Every method here runs on the engine's thread. MLX is imported only when a model is loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, Protocol

# Sampling settings a chat may carry, with the defaults a new chat starts from.
DEFAULT_SETTINGS: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "min_p": 0.0,
    "repetition_penalty": 1.05,
    "max_tokens": 1024,
    "seed": None,
    "context_policy": "refuse",
}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "lookup")


class Backend(Protocol):
    """What the generation thread needs from a model.

    `generate` yields responses shaped like qwen2_mlx's (`text`, `finish_reason` and the
    GenerationStats fields). The engine sets `prefill_progress` before each reply and reads
    `context_used` and `last_reply` (the whole reply as recorded, None if unknown) after it.
    """

    name: str
    context_limit: int
    context_used: int
    last_reply: Optional[str]
    prefill_progress: Optional[Callable[[int, int], None]]

    def load(self, progress: Callable[[float, str], None]) -> None: ...

    def generate(
        self, history: list[dict], system: Optional[str], settings: dict, cancel: threading.Event
    ) -> Iterator[Any]: ...

    def count_tokens(self, history: list[dict], system: Optional[str]) -> int: ...


def sampling_kwargs(settings: dict) -> dict:
    """The keyword arguments `Chat.stream` takes, from a chat's settings (None means default)."""
    kw = {k: settings[k] for k in SAMPLING_KEYS if settings.get(k) is not None}
    if "max_tokens" in settings:
        kw["max_tokens"] = settings["max_tokens"]
    return kw


def model_label(path: Path) -> str:
    """What the header calls a model: its folder name, or "default model" for convert.py's default."""
    from qwen2_mlx.loading.paths import default_model_path

    try:
        if Path(path).resolve() == default_model_path().resolve():
            return "default model"
    except OSError:
        pass
    return Path(path).name


class ModelBackend:
    """A converted model on disk, driven through `qwen2_mlx.generation.chat.Chat`.

    The store owns the conversation tree; one Chat object mirrors the branch being answered and
    keeps the KV cache. A new turn, a regenerate and an edit map onto Chat.stream / regenerate /
    edit, so only the new suffix is prefilled; any other jump (another branch, another chat)
    rebuilds the Chat's history and Chat's prefix diff reuses what the cache still shares.
    """

    def __init__(
        self,
        path: Path,
        dtype: Optional[str] = None,
        overrides: Optional[dict] = None,
        draft_path: Optional[Path] = None,
        num_draft_tokens: int = 3,
    ):
        self.path = Path(path)
        self.draft_path = Path(draft_path) if draft_path else None  # a draft model for speculative decoding
        self.num_draft_tokens = num_draft_tokens
        self.draft_model = None
        self.name = model_label(self.path)
        self.dtype = dtype
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}  # dca=, rope_scaling=
        self.context_limit = 0
        self.context_used = 0
        self.last_reply: Optional[str] = None
        self.model = self.tokenizer = None
        self.chat = None
        self.prefill_progress: Optional[Callable[[int, int], None]] = None

    def load(self, progress: Callable[[float, str], None]) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from qwen2_mlx import load
        from qwen2_mlx.generation.generate import context_limit

        progress(0.0, f"reading {self.path}")
        dtype = getattr(mx, self.dtype) if self.dtype else None
        model, tokenizer = load(self.path, dtype=dtype, lazy=True, **self.overrides)
        params = [v for _, v in tree_flatten(model.parameters())]
        total = sum(p.nbytes for p in params) or 1
        done, batch, batch_bytes = 0, [], 0
        # Evaluate the lazily loaded weights in ~64 MB batches so the bar moves as they are read.
        for p in params:
            batch.append(p)
            batch_bytes += p.nbytes
            if batch_bytes >= 64 << 20:
                mx.eval(batch)
                done += batch_bytes
                batch, batch_bytes = [], 0
                progress(done / total, f"loading weights {done / 1e9:.2f}/{total / 1e9:.2f} GB")
        mx.eval(batch)
        progress(1.0, f"loaded {total / 1e9:.2f} GB")
        if self.draft_path is not None:
            self.draft_model = self._load_draft(model, tokenizer, dtype, progress)
        self.model, self.tokenizer = model, tokenizer
        self.context_limit = context_limit(model)

    def _load_draft(self, model, tokenizer, dtype, progress):
        """The draft model, refused in one line unless it shares the model's tokenizer."""
        import mlx.core as mx

        from qwen2_mlx import load
        from qwen2_mlx.generation.proposers import check_draft, check_draft_tokenizer

        progress(1.0, f"reading the draft model {self.draft_path}")
        draft, draft_tokenizer = load(self.draft_path, dtype=dtype)
        check_draft_tokenizer(tokenizer, draft_tokenizer)
        check_draft(model, draft, len(tokenizer._tokenizer))
        mx.eval(draft.parameters())
        return draft

    def generate(self, history, system, settings, cancel):
        prefix, last = history[:-1], history[-1]
        if last["role"] != "user":
            raise ValueError("the conversation must end with a user message")
        kw = sampling_kwargs(settings)
        if self.prefill_progress is not None:
            kw["prompt_progress_callback"] = self.prefill_progress
        chat = self._chat_for(system, settings)
        have = [m for m in chat.messages if m["role"] != "system"]
        offset = len(chat.messages) - len(have)
        n = len(prefix)
        if have == prefix:
            replies = chat.stream(last["content"], cancel=cancel, **kw)  # a new turn
        elif have[: n + 1] == history and len(have) <= n + 2:
            replies = chat.regenerate(cancel=cancel, **kw)  # a new reply to the same message
        elif have[:n] == prefix and len(have) > n and have[n]["role"] == "user":
            chat.edit(n + offset, last["content"])  # an edited message: Chat keeps the cache before it
            replies = chat.regenerate(cancel=cancel, **kw)
        else:  # another branch or another chat: rebuild the history, hand over the cache
            chat = self._rebuild(chat, prefix, system, settings)
            replies = chat.stream(last["content"], cancel=cancel, **kw)
        self.last_reply = None
        try:
            yield from replies
        finally:
            replies.close()
        self.context_used = chat.context_used
        final = chat.messages[-1] if chat.messages else None
        if final is not None and final["role"] == "assistant":
            self.last_reply = final["content"]

    def _chat_for(self, system, settings):
        from qwen2_mlx.generation.chat import Chat

        policy = settings.get("context_policy") or "refuse"
        if self.chat is None:
            self.chat = Chat(
                self.model,
                self.tokenizer,
                system=system,
                context_policy=policy,
                draft_model=self.draft_model,
                num_draft_tokens=self.num_draft_tokens,
            )
        self.chat.context_policy = policy
        self.chat.system = system
        return self.chat

    def _rebuild(self, chat, messages: list[dict], system, settings):
        """Point the Chat at another branch; its prefix diff keeps the cached tokens they share."""
        chat.messages = list(messages)
        chat.system = system
        return chat

    def count_tokens(self, history, system) -> int:
        msgs = ([{"role": "system", "content": system}] if system else []) + list(history)
        ids = self.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
        return len(ids)
