"""The model behind the chat app: `ModelBackend` loads a converted model and generates replies.

`Backend` is the interface the generation thread (`engine.Engine`) drives; `ModelBackend` is the
real one, over `qwen2_mlx.generation.chat.Chat`, and `fake.FakeBackend` the scripted one for tests.
Every method here runs on the engine's thread. MLX is imported only when a model is loaded.

`ModelBackend` also keeps each chat's KV cache on disk (`qwen2_mlx.generation.cache_store`): it is
written when a reply ends, when another chat is opened and at quit (skipped when the cached tokens
did not change), and loaded when a chat is reopened, so a restart prefills only the new suffix.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, Protocol

from qwen2_mlx.generation.settings import turn_settings

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
# Prompt tokens per prefill step in the app: Esc stops a long read, and checkpoints land, at step ends,
# so a step is a few seconds on a small machine rather than the library's 2048 tokens.
PREFILL_STEP = 512
DEFAULT_CACHE_DISK = 4_000_000_000  # bytes of chat caches kept on disk (cache_store.DEFAULT_BUDGET; /set cache-disk)


def cache_dir() -> Path:
    """Where the chat app keeps each chat's KV cache between runs."""
    from qwen2_mlx.loading.paths import data_dir

    return data_dir() / "caches"


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


def _quantized(chat) -> bool:
    """Whether the chat's KV cache holds quantized layers (kv_bits="auto" switches during a reply)."""
    from qwen2_mlx.generation.kv_quant import cache_bits

    return chat._cache is not None and cache_bits(chat._cache) is not None


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
        cache_root: Optional[Path] = None,
        cache_budget: Optional[int] = None,
        checkpoint_seconds: float = 20.0,
        checkpoint_tokens: Optional[int] = None,
        prefill_step_size: Optional[int] = PREFILL_STEP,
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
        # Chat caches on disk. The Chat's cache holds the turns of `cache_owner` (a chat key);
        # `active_key` is the chat on screen; `_persisted` the (key, tokens) last written.
        self.cache_root = cache_root
        self.cache_budget = cache_budget
        self.cache_store = None
        self.cache_owner: Optional[str] = None
        self.active_key: Optional[str] = None
        self.cache_note: Optional[tuple[str, bool]] = None  # (text, warning) for the status bar, after a reply
        self._persisted: tuple = (None, None)
        self._validity: Optional[tuple] = None  # (kv settings, validity) of the last computation
        self._announce_reuse = False
        # A long read is checkpointed to the chat's cache file as it goes (generation/checkpoint.py).
        self.checkpoint_seconds, self.checkpoint_tokens = checkpoint_seconds, checkpoint_tokens
        self.prefill_step_size = prefill_step_size  # None: the library's default (2048)
        self.checkpoints = 0  # checkpoints written during the last reply

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
        self._open_store()

    def _open_store(self) -> None:
        from qwen2_mlx.generation.cache_store import CacheStore

        budget = DEFAULT_CACHE_DISK if self.cache_budget is None else self.cache_budget
        try:
            self.cache_store = CacheStore(self.cache_root or cache_dir(), budget)
        except OSError:  # an unreadable data folder costs the caches, never the chat
            self.cache_store = None

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
        self.cache_note = None
        prefix, last = history[:-1], history[-1]
        if last["role"] != "user":
            raise ValueError("the conversation must end with a user message")
        chat = self._chat_for(system, settings)
        if self._set_kv_bits(settings.get("kv_bits"), settings.get("memory_budget")) and self.cache_owner is not None:
            self._announce_reuse = False  # nothing loaded is reused: the cache was dropped
            self.cache_note = ("KV cache quantization changed: the chat's cache was rebuilt", False)
        # The chat's settings (draft model, KV cache) with this chat's sampling and limits on top.
        step = {"prefill_step_size": self.prefill_step_size} if self.prefill_step_size else {}
        kw = {
            "settings": chat.settings.replace(**turn_settings(settings), **step),
            "prompt_progress_callback": self.prefill_progress,
            "checkpoint": self._checkpointer(),  # after the KV settings: the file is tagged with them
        }
        checkpoint = kw["checkpoint"]
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
        was_float = not _quantized(chat)
        # From here the cache holds this chat's turns (the previous owner's were saved by open_chat),
        # also when the reply fails or is stopped half-way.
        self.cache_owner = self.active_key
        try:
            yield from replies
        finally:
            replies.close()
        self.context_used = chat.context_used
        final = chat.messages[-1] if chat.messages else None
        if final is not None and final["role"] == "assistant":
            self.last_reply = final["content"]
        self.checkpoints = checkpoint.writes if checkpoint is not None else 0
        kv = chat.kv_quantization
        if kv is not None and kv.auto and was_float and _quantized(chat):
            self.cache_note = (
                f"KV cache now {kv.bits}-bit: past {kv.start:,} tokens a float cache would pass the memory budget",
                False,
            )
        if self._announce_reuse:  # the first reply after loading a chat's cache from disk
            self._announce_reuse = False
            self.cache_note = (f"reused {chat.last_cached_tokens:,} cached tokens", False)

    def _checkpointer(self):
        """What saves a long read as it goes: the chat's cache file, rewritten every few seconds."""
        if not self._store_on() or self.active_key is None:
            return None
        from qwen2_mlx.generation.checkpoint import Checkpointer

        key = self.active_key

        def saved(tokens: list) -> None:
            self._persisted = (key, tokens)  # persist() need not write the same tokens again

        every = {"every_seconds": self.checkpoint_seconds, "every_tokens": self.checkpoint_tokens}
        return Checkpointer(self.cache_store, key, self.validity(), self.model, on_save=saved, **every)

    def measure_prefill(self):
        """This model's reading speed here (qwen2_mlx.generation.reading_time), so the chat can estimate
        how long an attachment takes to read before it is sent."""
        from qwen2_mlx.generation.reading_time import measure_reading_speed

        return measure_reading_speed(self.model, self.tokenizer)

    # --- chat caches on disk ----------------------------------------------------------------------
    def _chat(self):
        from qwen2_mlx.generation.chat import Chat

        if self.chat is None:
            self.chat = Chat(
                self.model, self.tokenizer, draft_model=self.draft_model, num_draft_tokens=self.num_draft_tokens
            )
        return self.chat

    def _store_on(self) -> bool:
        return self.cache_store is not None and self.cache_store.budget > 0 and self.model is not None

    def validity(self) -> dict:
        """What a chat cache must have been made with to be loaded here (see cache_store.py)."""
        from qwen2_mlx.generation.cache_store import chat_cache_validity

        chat = self._chat()
        if self._validity is None or self._validity[0] != chat.kv_settings:
            self._validity = (dict(chat.kv_settings), chat_cache_validity(chat, self.path))
        return self._validity[1]

    def open_chat(
        self, key: Optional[str], expect: bool = False, kv_bits: Optional[int] = None
    ) -> Optional[tuple[str, bool]]:
        """The chat `key` is on screen: save the cache of the one before, load this one's from disk.

        Returns a (text, warning) note for the status bar, or None. `expect`: the chat has replies,
        so a missing cache is worth a line. `kv_bits`: the chat's KV-cache quantization.
        """
        self.active_key = key
        if key == self.cache_owner or not self._store_on():
            return None
        note = self.persist()
        if key is None:  # a new chat: the cache stays in memory, its system prompt may be reused
            return note
        self._set_kv_bits(kv_bits)
        if self.cache_store.path(key).is_file():
            self._chat().clear_cache()  # saved above: free it before the next one is read, not after
            self.cache_owner = None
        loaded = self.cache_store.load(key, self.validity(), self.model)
        if not loaded.ok:
            if loaded.status != "missing":
                self.cache_store.delete(key)  # unusable: rebuilt and written again after the next reply
            elif not expect:
                return note
            return (f"chat cache ignored: {loaded.reason}; the next reply reads the whole chat", True)
        self._chat().adopt_cache(loaded.cache, loaded.tokens)
        self.cache_owner, self._persisted = key, (key, list(loaded.tokens))
        self._announce_reuse = True
        return (f"loaded {len(loaded.tokens):,} cached tokens from disk in {loaded.seconds:.1f}s", False)

    def _set_kv_bits(self, kv_bits, memory_budget: Optional[int] = None) -> bool:
        """Quantize the KV cache to `kv_bits` (4, 8, "auto", None: float). A change drops the cache: it is rebuilt."""
        if self.model is None:
            return False
        if memory_budget is not None:  # open_chat does not carry it: the last one given holds
            self._memory_budget = memory_budget
        return self._chat().set_kv_quantization(kv_bits, memory_budget=getattr(self, "_memory_budget", None))

    def persist(self) -> Optional[tuple[str, bool]]:
        """Write the cache of `cache_owner` unless it holds the same tokens as the last write."""
        if self.cache_owner is None or self.chat is None or not self._store_on():
            return None
        cache, tokens = self.chat.export_cache()
        if cache is None or not tokens or self._persisted == (self.cache_owner, tokens):
            return None
        self._persisted = (self.cache_owner, tokens)
        saved = self.cache_store.save(self.cache_owner, cache, tokens, self.validity(), self.model)
        if not saved.written:
            return (f"chat cache not saved: {saved.reason}", True)
        return None

    def forget_chat(self, key: str) -> None:
        """The chat was deleted: so is its cache file."""
        if self.cache_store is not None:
            self.cache_store.delete(key)
        if self.cache_owner == key:
            self.cache_owner, self._persisted = None, (None, None)

    def set_cache_budget(self, budget: int) -> Optional[tuple[str, bool]]:
        from qwen2_mlx.generation.cache_store import format_size

        self.cache_budget = budget
        if self.cache_store is None:
            return None
        evicted = self.cache_store.set_budget(budget)
        if budget <= 0:
            return ("chat caches on disk are off (all removed)" if evicted else "chat caches on disk are off", False)
        if evicted:
            return (f"disk budget {format_size(budget)}: evicted {len(evicted)} old chat cache(s)", False)
        return None

    def _chat_for(self, system, settings):
        policy = settings.get("context_policy") or "refuse"
        self._chat()
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
