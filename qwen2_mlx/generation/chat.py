"""`Chat`: a conversation with a model, reusing the KV cache from turn to turn.

Every turn renders the whole active history with the chat template and prefills only the suffix
the cache does not already hold (longest common prefix of token ids; the cache is trimmed back
where a branch, an edit or a re-tokenized reply diverges). History is a tree: `regenerate` adds a
sibling reply and keeps the old one reachable through `branches`/`switch_branch`. Overflowing the
context window follows an explicit policy: "refuse" (ContextOverflowError) or "drop_oldest".

The rooms: the message tree is history.py, the caches' bookkeeping chat_cache.py, the file format
chat_file.py; this module renders the history into tokens and runs the turns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

import mlx.nn as nn

from .attachments import Attachment, read_attachment, render_message
from .chat_cache import ChatCaches
from .chat_cache import common_prefix as _common_prefix  # noqa: F401 (the name tests and callers import)
from .chat_file import ChatFileError, read_chat, write_chat  # noqa: F401 (ChatFileError: public here)
from .generate import (
    ContextOverflowError,
    GenerationResponse,
    GenerationStats,
    Reply,
    as_wrapper,
    context_limit,
    stream_generate,
)
from .history import MessageTree, Node, validate_message
from .kv_quant import KVQuantization
from .notebook import chat_markdown
from .settings import ALIASES, CHAT_KEYS, KV_KEYS, SAMPLING_KEYS, GenerationSettings

POLICIES = ("refuse", "drop_oldest")
_TURN_DEFAULTS = GenerationSettings(max_tokens=None)  # a chat's reply runs to the end of its turn by default


def _check_settings(settings: dict, allowed: tuple) -> None:
    for k in settings:
        if k not in allowed:
            raise TypeError(f"unknown generation setting {k!r} (known: {', '.join(allowed)})")


class ReplyStream:
    """The responses of one reply (an iterator). `close()` stops it; the partial reply is kept."""

    def __init__(self, chat: Chat):
        self._chat = chat
        self._gen: Optional[Iterator[GenerationResponse]] = None

    def __iter__(self) -> ReplyStream:
        return self

    def __next__(self) -> GenerationResponse:
        return next(self._gen)

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
        self._chat._release(self)  # also when it never started (a generator that never ran has no finally)

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the modules it needs may already be gone
            pass


class Chat:
    """A chat session. See the module docstring.

    Settings are a `GenerationSettings` (`settings=`) and/or its field names as keywords
    (`temperature=0.7`, `kv_bits=8`, `draft_model=...`), for every turn; a turn's own keywords
    (or `settings=`) go on top of them for that turn. `chat.sampling` holds the plain settings a
    saved chat keeps; the draft model, prompt lookup and KV-cache quantization are attributes.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        system: Optional[str] = None,
        messages: Optional[list] = None,
        context_policy: str = "refuse",
        max_context: Optional[int] = None,
        settings: Optional[GenerationSettings] = None,
        **kw: Any,
    ):
        if context_policy not in POLICIES:
            raise ValueError(f"context_policy must be one of {POLICIES}, not {context_policy!r}")
        given = _given(settings, {**kw, **({} if max_context is None else {"max_context": max_context})})
        max_context = given.pop("max_context", None)
        model_limit = context_limit(model)
        if max_context is not None and not (0 < max_context <= model_limit):
            raise ValueError(f"max_context must be between 1 and the model's {model_limit} tokens")
        kv = {k: given.pop(k) for k in KV_KEYS if k in given}
        # KV-cache quantization (kv_quant.py) belongs to the chat, not to a turn: its cache is built with it.
        self.kv_quantization = KVQuantization.make(kv.get("kv_bits"), **_kv_rest(kv), model=model)
        self.model = model
        self.tokenizer = as_wrapper(tokenizer)
        self.context_policy = context_policy
        self.max_context = max_context
        # Speculative decoding (see generation/speculative.py); prompt lookup wins when both are set.
        self.draft_model = given.pop("draft_model", None)
        self.num_draft_tokens = given.pop("num_draft_tokens", 3)
        self.lookup = given.pop("lookup", None)
        self.sampling: dict = {k: given.pop(k) for k in SAMPLING_KEYS if k in given}
        self._extra = given  # a turn's objects given to the chat: sampler, logits processors, a schema
        self.settings  # noqa: B018 (bad settings fail here, naming the field)
        self._tree = MessageTree()
        self.system = system
        self._caches = ChatCaches(model)
        self.last_cached_tokens = 0  # tokens of the last reply's prompt that came from the cache
        self._busy: Optional[ReplyStream] = None
        self._used_memo: tuple = (None, 0)
        if messages and system is not None and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            raise ValueError("messages[0]: a system message and system= were both given")
        self.messages = list(messages or [])
        self.attachments: list[Attachment] = []  # read by attach(), sent with the next message

    # --- settings ------------------------------------------------------------------------------
    @property
    def settings(self) -> GenerationSettings:
        """What a turn runs with before its own keywords: the chat's settings as one object."""
        _check_settings(self.sampling, SAMPLING_KEYS)
        return _TURN_DEFAULTS.replace(
            **self._extra,
            **self.sampling,
            draft_model=self.draft_model,
            num_draft_tokens=self.num_draft_tokens,
            lookup=self.lookup,
            max_context=self.max_context,
            **self.kv_settings,
        )

    def _turn_settings(self, settings: Optional[GenerationSettings], overrides: dict) -> GenerationSettings:
        """The chat's settings, or a turn's `settings=`, with the turn's keywords on top."""
        base = self.settings
        if settings is not None:
            for name in CHAT_KEYS:
                if not _same(getattr(settings, name), getattr(base, name)):
                    raise ValueError(f"{name} is a setting of the chat, not of a turn: set it on the chat")
            base = settings
        for name in overrides:
            if name in CHAT_KEYS:
                raise TypeError(f"{name} is a setting of the chat, not of a turn: set it on the chat")
        return base.replace(**overrides)

    # --- history -----------------------------------------------------------------------------
    @property
    def _root(self) -> Node:
        return self._tree.root

    @property
    def dropped(self) -> list[dict]:
        """Messages removed by the "drop_oldest" policy, oldest first."""
        return self._tree.dropped

    @dropped.setter
    def dropped(self, value: list[dict]) -> None:
        self._tree.dropped = value

    @property
    def system(self) -> Optional[str]:
        return self._system

    @system.setter
    def system(self, value: Optional[str]) -> None:
        self._system = value
        self._tree.offset = 1 if value is not None else 0

    def _dicts(self, nodes: list[Node]) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [{"role": n.role, "content": n.content} for n in nodes]

    @property
    def messages(self) -> list[dict]:
        """The active branch as `{"role", "content"}` dicts, the system message first when set."""
        return self._dicts(self._tree.path())

    @messages.setter
    def messages(self, messages: list) -> None:
        """Replace the conversation with one branch, keeping the KV cache for the common prefix.

        A leading system message becomes `chat.system`; without one the system prompt is kept.
        Front ends that own their own history use this to point the chat at another branch.
        """
        self._check_idle()
        nodes, system = [], self.system
        for i, m in enumerate(messages):
            role, content = validate_message(m, f"messages[{i}]")
            if role == "system":
                if i != 0:
                    raise ValueError(f"messages[{i}]: a system message can only come first")
                system = content
            else:
                nodes.append(Node(role, content))
        self.system = system
        self._tree.replace(nodes)

    @property
    def last_reply(self) -> Optional[Reply]:
        """The last assistant message of the active branch, with its finish reason and stats."""
        for node in reversed(self._tree.path()):
            if node.role == "assistant":
                return Reply(node.content, node.finish_reason, GenerationStats.from_dict(node.stats))
        return None

    def edit(self, index: int, text: str) -> None:
        """Change the user message at `index` and drop everything after it; `regenerate()` answers it."""
        self._check_idle()
        self._tree.edit(index, text)

    def branches(self, index: int) -> list[str]:
        """The alternative replies at the assistant message `index` (the shown one is `active`)."""
        _, parent = self._tree.reply_at(index)
        return [c.content for c in parent.children]

    def switch_branch(self, index: int, k: int) -> None:
        """Show alternative `k` (see `branches(index)`) at the assistant message `index`."""
        self._check_idle()
        self._tree.switch_branch(index, k)

    def active_branch(self, index: int) -> int:
        """Which alternative is shown at the assistant message `index`."""
        _, parent = self._tree.node_at(index)
        return parent.active

    def _repr_markdown_(self) -> str:
        return chat_markdown(self.messages)

    def clear(self) -> None:
        """Forget the conversation (the system prompt and settings stay; the cache is reused)."""
        self._check_idle()
        self._tree.clear()

    # --- tokens and context --------------------------------------------------------------------
    def _tokens(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        if not messages:
            return []
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @property
    def context_limit(self) -> int:
        """The most tokens a turn may hold: `max_context`, or the model's context window."""
        return self.max_context or context_limit(self.model)

    @property
    def context_used(self) -> int:
        """Tokens the active history takes with the chat template applied."""
        messages = self.messages
        key = json.dumps(messages)
        if self._used_memo[0] != key:
            self._used_memo = (key, len(self._tokens(messages, False)))
        return self._used_memo[1]

    def _fit(self, upto: Node, max_tokens: Optional[int]) -> list[int]:
        """Prompt ids for a reply to `upto`, applying the context policy."""
        limit, drop = self.context_limit, self.context_policy == "drop_oldest"
        while True:
            path = self._tree.path_to(upto)
            ids = self._tokens(self._dicts(path), True)
            reserve = max_tokens if (drop and max_tokens) else 1
            if len(ids) + reserve <= limit:
                return ids
            can_drop = self._tree.can_drop(path)
            if len(ids) < limit and drop and not can_drop:
                return ids  # nothing left to drop; the reply ends with "context" if it gets there
            if not drop or not can_drop:
                raise ContextOverflowError(
                    f"the conversation needs {len(ids)} tokens with the chat template, more than the "
                    f"context window of {limit} tokens allows; start a new chat, edit or clear it, or use "
                    f"context_policy='drop_oldest'"
                )
            self._tree.drop_oldest_turn(path)

    # --- the KV caches (chat_cache.py) -----------------------------------------------------------
    @property
    def _cache(self) -> Optional[list]:
        return self._caches.cache

    @property
    def _cache_tokens(self) -> list[int]:
        return self._caches.tokens

    @property
    def _draft_cache(self) -> Optional[list]:
        return self._caches.draft_cache

    @property
    def _draft_of(self) -> Optional[nn.Module]:
        return self._caches.draft_of

    def export_cache(self) -> tuple[Optional[list], list[int]]:
        """The KV cache (None before the first reply) and a copy of the token ids it holds, to save.

        The cache is the live one, not a copy: write it out before the next turn changes it.
        """
        self._check_idle()
        return self._caches.cache, list(self._caches.tokens)

    def clear_cache(self) -> None:
        """Drop the KV cache (its memory is freed); the next turn prefills the whole history."""
        self._check_idle()
        self._caches.clear()

    def adopt_cache(self, cache: list, tokens: list[int]) -> None:
        """Use a cache loaded from disk (see generation/cache_store.py) that holds exactly `tokens`.

        It replaces the chat's own cache; the next turn's prefix diff decides how much of it is
        reused, so a cache that shares little with the history costs a trim, never a wrong reply.
        """
        self._check_idle()
        self._caches.adopt(cache, tokens)

    def _sync_cache(self, held: list[int]) -> None:
        """After a turn: keep only the cached tokens that the rendered history agrees with."""
        self._caches.sync(held, self._tokens(self.messages, False))

    @property
    def kv_settings(self) -> dict:
        """`kv_bits`, `kv_group_size`, `quantized_kv_start` as given (kv_bits None: a float cache)."""
        kv = self.kv_quantization
        return kv.to_dict() if kv is not None else {"kv_bits": None, "kv_group_size": 64, "quantized_kv_start": 0}

    def set_kv_quantization(
        self, kv_bits: Any, kv_group_size: int = 64, quantized_kv_start: int = 0, memory_budget: Any = None
    ) -> bool:
        """Change the KV-cache quantization; a cache built otherwise is dropped (the next turn prefills
        the history again). Returns whether it changed."""
        self._check_idle()
        kv = KVQuantization.make(kv_bits, kv_group_size, quantized_kv_start, self.model, memory_budget)
        if kv == self.kv_quantization:
            return False
        self.kv_quantization = kv
        self._caches.clear()
        return True

    # --- generation ----------------------------------------------------------------------------
    def _check_idle(self) -> None:
        if self._busy is not None:
            raise RuntimeError("a reply is still being generated: finish the stream or close() it first")

    def stream(
        self,
        text: str,
        cancel: Any = None,
        *,
        settings: Optional[GenerationSettings] = None,
        prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
        checkpoint: Optional[Callable[[list, list[int]], Any]] = None,
        **kw: Any,
    ) -> ReplyStream:
        """Send a user message and stream the reply; the last response carries `finish_reason`.

        A reply cut short (cancel event, closing the iterator, Ctrl-C) keeps its partial text in
        the history with finish reason "cancelled". Raises ContextOverflowError (the message is
        not added) when the conversation does not fit and the policy is "refuse". Files given to
        `attach` go before `text`. `checkpoint` (e.g. checkpoint.Checkpointer) is called after each
        prefill step with the model's cache layers and the prompt ids they hold, to save a long read.
        """
        self._check_idle()
        if not isinstance(text, str):
            raise TypeError("the message must be a string")
        turn = self._turn_settings(settings, kw)
        leaf = self._tree.leaf()
        node = leaf.append(Node("user", render_message(self.attachments, text)))
        try:
            ids = self._fit(node, turn.max_tokens)
        except BaseException:
            self._tree.remove(leaf, node)
            raise
        self.attachments = []  # sent: they are part of the message now
        return self._reply(node, ids, cancel, turn, prompt_progress_callback, checkpoint)

    def attach(self, path: Union[str, Path, Attachment]) -> Attachment:
        """Read a file, folder or PDF (attachments.py); its text goes before the next message sent."""
        attachment = path if isinstance(path, Attachment) else read_attachment(path)
        self.attachments.append(attachment)
        return attachment

    def send(self, text: str, **kw: Any) -> Reply:
        """Send a user message and return the whole reply (a str with `.finish_reason`, `.stats`)."""
        return self._collect(self.stream(text, **kw))

    def regenerate(
        self,
        cancel: Any = None,
        *,
        settings: Optional[GenerationSettings] = None,
        prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
        checkpoint: Optional[Callable[[list, list[int]], Any]] = None,
        **kw: Any,
    ) -> ReplyStream:
        """Stream a new reply to the last user message; an old reply stays reachable as a branch."""
        self._check_idle()
        turn = self._turn_settings(settings, kw)
        node = self._tree.last_user()
        ids = self._fit(node, turn.max_tokens)
        return self._reply(node, ids, cancel, turn, prompt_progress_callback, checkpoint)

    @staticmethod
    def _collect(responses: Iterator[GenerationResponse]) -> Reply:
        parts, last = [], None
        for last in responses:
            parts.append(last.text)
        return Reply("".join(parts), last.finish_reason if last else "cancelled", GenerationStats.from_response(last))

    def _reply(
        self, parent: Node, ids: list[int], cancel: Any, turn: GenerationSettings, progress, checkpoint=None
    ) -> ReplyStream:
        stream = ReplyStream(self)
        state = _Turn(parent, ids, cancel, turn, progress)
        state.checkpoint = checkpoint
        stream._gen = self._run(state, stream)
        self._busy = stream
        return stream

    def _release(self, stream: ReplyStream) -> None:
        if self._busy is stream:
            self._busy = None

    def _start(self, turn: _Turn) -> Iterator[GenerationResponse]:
        """Bring the caches to the turn's prompt and start generating the part they do not hold."""
        s = turn.settings
        lookup = s.lookup_settings
        draft = s.draft_model if lookup is None else None
        suffix = self._caches.reuse(turn.ids, draft, self.tokenizer, self.kv_settings)
        cached = len(turn.ids) - len(suffix)
        self.last_cached_tokens = cached
        turn.run_list = self._caches.run_list(draft)
        progress = _checkpointing(turn, len(self._caches.cache)) if turn.checkpoint is not None else turn.progress
        return stream_generate(
            self.model,
            self.tokenizer,
            suffix,
            settings=s.replace(draft_model=draft, lookup=lookup, max_context=self.context_limit),
            prompt_cache=turn.run_list,
            cancel=turn.cancel,
            prompt_progress_callback=progress,
            context_tokens=turn.ids[:cached] if lookup is not None else (),
        )

    def _record(self, turn: _Turn, reason: str) -> None:
        """The reply goes into the history (a cancelled one only if it has text) and the caches follow."""
        self._caches.take_back(turn.run_list)
        turn.recorded = True
        text = "".join(turn.parts)
        if text or reason != "cancelled":
            stats = GenerationStats.from_response(turn.last).to_dict()
            turn.parent.append(Node("assistant", text, finish_reason=reason, stats=stats))
        self._sync_cache(turn.ids + turn.generated)

    def _run(self, turn: _Turn, stream: ReplyStream) -> Iterator[GenerationResponse]:
        responses = None
        try:
            responses = self._start(turn)
            for r in responses:
                turn.parts.append(r.text)
                if r.generation_tokens > len(turn.generated):
                    turn.generated.append(r.token)
                turn.last = r
                if r.finish_reason is not None:
                    self._record(turn, r.finish_reason)  # before the last yield: the history is final when it arrives
                yield r
        except (GeneratorExit, KeyboardInterrupt):
            if not turn.recorded:
                self._record(turn, "cancelled")
            raise
        except BaseException:
            if self._caches.cache is not None and not turn.recorded:
                self._caches.take_back(turn.run_list)
                self._sync_cache(turn.ids + turn.generated)
            raise
        finally:
            if responses is not None:
                responses.close()
            self._caches.take_back(turn.run_list)
            self._release(stream)

    # --- save / load (chat_file.py) --------------------------------------------------------------
    def save(self, path: Union[str, Path], include_cache: bool = False) -> None:
        """Write the chat (messages, branches, settings) as JSON; optionally the KV cache beside it.

        The cache goes to `<name>.kv.safetensors` next to the JSON file, tagged with the model's
        long-context settings. Both files are written under temporary names and then renamed.
        """
        self._check_idle()
        write_chat(self, Path(path), include_cache)

    @classmethod
    def load(cls, path: Union[str, Path], model: nn.Module, tokenizer) -> Chat:
        """Read a chat written by `save`; its KV cache too when one was saved with it."""
        return read_chat(cls, Path(path), model, tokenizer)


class _Turn:
    """One reply in progress: what it answers, its prompt ids, settings, and what came back so far."""

    def __init__(self, parent: Node, ids: list[int], cancel: Any, settings: GenerationSettings, progress):
        self.parent, self.ids, self.cancel, self.settings, self.progress = parent, ids, cancel, settings, progress
        self.parts: list[str] = []
        self.generated: list[int] = []
        self.last: Optional[GenerationResponse] = None
        self.recorded = False
        self.run_list: list = []
        self.checkpoint = None  # called with (cache layers, prompt ids they hold) after each prefill step


def _checkpointing(turn: _Turn, layers: int) -> Callable[[int, int], None]:
    """The turn's progress callback, then its checkpoint with what the cache holds, while reading."""

    def progress(done: int, total: int) -> None:
        if turn.progress is not None:
            turn.progress(done, total)
        held = getattr(turn.run_list[0], "offset", 0)
        if done < total and 0 < held <= len(turn.ids):  # while reading, not once decoding has begun
            turn.checkpoint(turn.run_list[:layers], turn.ids[:held])

    return progress


def _given(settings: Optional[GenerationSettings], kw: dict) -> dict:
    """The settings a chat was given: `settings`' fields that differ from a chat's defaults, then `kw`."""
    given = {}
    if settings is not None:
        if not isinstance(settings, GenerationSettings):
            raise TypeError(f"settings must be a GenerationSettings, not {type(settings).__name__}")
        given = {k: v for k, v in vars(settings).items() if not _same(v, getattr(_TURN_DEFAULTS, k))}
    checked = GenerationSettings.build(**kw)  # unknown names and bad values fail here, named
    given.update({name: getattr(checked, name) for name in _names(kw)})
    return given


def _names(kw: dict) -> list[str]:
    return [ALIASES.get(k, k) for k in kw]


def _same(a: Any, b: Any) -> bool:
    """Equal settings; models compare by identity (an `nn.Module` is a dict of arrays)."""
    if isinstance(a, nn.Module) or isinstance(b, nn.Module):
        return a is b
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _kv_rest(kv: dict) -> dict:
    return {k: kv[k] for k in ("kv_group_size", "quantized_kv_start", "memory_budget") if k in kv}
