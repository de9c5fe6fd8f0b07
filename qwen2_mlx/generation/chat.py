"""`Chat`: a conversation with a model, reusing the KV cache from turn to turn.

Every turn renders the whole active history with the chat template and prefills only the suffix
the cache does not already hold (longest common prefix of token ids; the cache is trimmed back
where a branch, an edit or a re-tokenized reply diverges). History is a tree: `regenerate` adds a
sibling reply and keeps the old one reachable through `branches`/`switch_branch`. Overflowing the
context window follows an explicit policy: "refuse" (ContextOverflowError) or "drop_oldest".
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import mlx.nn as nn

from .attachments import Attachment, read_attachment, render_message
from .generate import (
    ContextOverflowError,
    GenerationResponse,
    GenerationStats,
    Reply,
    as_wrapper,
    context_limit,
    prefill_prompt_cache,
    stream_generate,
)
from .kv_quant import KVQuantization
from .notebook import chat_markdown
from .prompt_cache import (
    PromptCacheError,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

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
CALL_ONLY_KEYS = (
    "sampler",
    "logits_processors",
    "prompt_progress_callback",
    "prefill_step_size",
    "lookup",
    "checkpoint",
)
POLICIES = ("refuse", "drop_oldest")
FILE_FORMAT = "qwen2-mlx-chat"
FILE_VERSION = 1


class ChatFileError(ValueError):
    """A saved chat that cannot be loaded; the message names the file and the field."""


@dataclass
class _Node:
    """One message; `children` are the alternatives for the next message, `active` the one shown."""

    role: str
    content: str
    children: list = field(default_factory=list)
    active: int = 0
    finish_reason: Optional[str] = None
    stats: Optional[dict] = None

    def child(self) -> Optional[_Node]:
        return self.children[self.active] if self.children else None

    def to_dict(self) -> dict:
        d = {"role": self.role, "content": self.content}
        if self.finish_reason is not None:
            d["finish_reason"] = self.finish_reason
        if self.stats is not None:
            d["stats"] = self.stats
        if self.children:
            d["children"] = [c.to_dict() for c in self.children]
            d["active"] = self.active
        return d


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


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
    """A chat session. See the module docstring; sampling settings are stream_generate's."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        system: Optional[str] = None,
        messages: Optional[list] = None,
        context_policy: str = "refuse",
        max_context: Optional[int] = None,
        draft_model: Optional[nn.Module] = None,
        num_draft_tokens: int = 3,
        lookup: Any = None,
        kv_bits: Optional[int] = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 0,
        **sampling: Any,
    ):
        if context_policy not in POLICIES:
            raise ValueError(f"context_policy must be one of {POLICIES}, not {context_policy!r}")
        model_limit = context_limit(model)
        if max_context is not None and not (0 < max_context <= model_limit):
            raise ValueError(f"max_context must be between 1 and the model's {model_limit} tokens")
        _check_settings(sampling, SAMPLING_KEYS)
        # KV-cache quantization (kv_quant.py) belongs to the chat, not to a turn: its cache is built with it.
        self.kv_quantization = KVQuantization.make(kv_bits, kv_group_size, quantized_kv_start, model)
        self.model = model
        self.tokenizer = as_wrapper(tokenizer)
        self.context_policy = context_policy
        self.max_context = max_context
        self.sampling: dict = dict(sampling)
        self.system: Optional[str] = system
        self.dropped: list[dict] = []  # messages removed by the "drop_oldest" policy, oldest first
        self._root = _Node("root", "")
        self._cache: Optional[list] = None
        self._cache_tokens: list[int] = []  # exactly the token ids the KV cache holds
        self.last_cached_tokens = 0  # tokens of the last reply's prompt that came from the cache
        # Speculative decoding (see generation/speculative.py); prompt lookup wins when both are set.
        # The draft's cache holds a prefix of `_cache_tokens`, and is rebuilt for another draft model.
        self.draft_model = draft_model
        self.num_draft_tokens = num_draft_tokens
        self.lookup = lookup
        self._draft_cache: Optional[list] = None
        self._draft_of: Optional[nn.Module] = None
        self._busy: Optional[ReplyStream] = None
        self._used_memo: tuple = (None, 0)
        if messages and system is not None and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            raise ValueError("messages[0]: a system message and system= were both given")
        self.messages = list(messages or [])
        self.attachments: list[Attachment] = []  # read by attach(), sent with the next message

    # --- history -----------------------------------------------------------------------------
    @staticmethod
    def _validate_message(m: Any, where: str) -> tuple[str, str]:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: a message is a dict with a 'role' and a string 'content'")
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: role must be 'system', 'user' or 'assistant', not {m.get('role')!r}")
        return m["role"], m["content"]

    def _path(self) -> list[_Node]:
        path, node = [], self._root.child()
        while node is not None:
            path.append(node)
            node = node.child()
        return path

    def _leaf(self) -> _Node:
        path = self._path()
        return path[-1] if path else self._root

    @staticmethod
    def _append(parent: _Node, node: _Node) -> _Node:
        parent.children.append(node)
        parent.active = len(parent.children) - 1
        return node

    def _offset(self) -> int:
        return 1 if self.system is not None else 0

    def _node_at(self, index: int) -> tuple[_Node, _Node]:
        """(node, parent) of the message at `index` in `self.messages`."""
        path = self._path()
        n = len(path) + self._offset()
        if not -n <= index < n:
            raise IndexError(f"message index {index} is out of range ({n} messages)")
        i = (index % n) - self._offset()
        if i < 0:
            raise ValueError("that is the system message: set chat.system to change it")
        return path[i], (path[i - 1] if i > 0 else self._root)

    def _dicts(self, nodes: list[_Node]) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [{"role": n.role, "content": n.content} for n in nodes]

    @property
    def messages(self) -> list[dict]:
        """The active branch as `{"role", "content"}` dicts, the system message first when set."""
        return self._dicts(self._path())

    @messages.setter
    def messages(self, messages: list) -> None:
        """Replace the conversation with one branch, keeping the KV cache for the common prefix.

        A leading system message becomes `chat.system`; without one the system prompt is kept.
        Front ends that own their own history use this to point the chat at another branch.
        """
        self._check_idle()
        nodes, system = [], self.system
        for i, m in enumerate(messages):
            role, content = self._validate_message(m, f"messages[{i}]")
            if role == "system":
                if i != 0:
                    raise ValueError(f"messages[{i}]: a system message can only come first")
                system = content
            else:
                nodes.append(_Node(role, content))
        self._root, self.system = _Node("root", ""), system
        for node in nodes:
            self._append(self._leaf(), node)

    @property
    def last_reply(self) -> Optional[Reply]:
        """The last assistant message of the active branch, with its finish reason and stats."""
        for node in reversed(self._path()):
            if node.role == "assistant":
                return Reply(node.content, node.finish_reason, GenerationStats.from_dict(node.stats))
        return None

    def edit(self, index: int, text: str) -> None:
        """Change the user message at `index` and drop everything after it; `regenerate()` answers it."""
        self._check_idle()
        node, _ = self._node_at(index)
        if node.role != "user":
            raise ValueError(f"message {index} is an {node.role} message; edit changes user messages")
        node.content = text
        node.children, node.active = [], 0

    def branches(self, index: int) -> list[str]:
        """The alternative replies at the assistant message `index` (the shown one is `active`)."""
        node, parent = self._node_at(index)
        if node.role != "assistant":
            raise ValueError(f"message {index} is a {node.role} message; branches are alternative replies")
        return [c.content for c in parent.children]

    def switch_branch(self, index: int, k: int) -> None:
        """Show alternative `k` (see `branches(index)`) at the assistant message `index`."""
        self._check_idle()
        node, parent = self._node_at(index)
        if node.role != "assistant":
            raise ValueError(f"message {index} is a {node.role} message; branches are alternative replies")
        if not 0 <= k < len(parent.children):
            raise IndexError(f"branch {k} is out of range ({len(parent.children)} alternatives)")
        parent.active = k

    def active_branch(self, index: int) -> int:
        """Which alternative is shown at the assistant message `index`."""
        _, parent = self._node_at(index)
        return parent.active

    def _repr_markdown_(self) -> str:
        return chat_markdown(self.messages)

    def clear(self) -> None:
        """Forget the conversation (the system prompt and settings stay; the cache is reused)."""
        self._check_idle()
        self._root = _Node("root", "")
        self.dropped = []

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

    def _fit(self, upto: _Node, max_tokens: Optional[int]) -> list[int]:
        """Prompt ids for a reply to `upto`, applying the context policy."""
        limit = self.context_limit
        while True:
            path = self._path_to(upto)
            ids = self._tokens(self._dicts(path), True)
            reserve = max_tokens if (self.context_policy == "drop_oldest" and max_tokens) else 1
            if len(ids) + reserve <= limit:
                return ids
            if len(ids) < limit and self.context_policy == "drop_oldest" and not self._can_drop(path):
                return ids  # nothing left to drop; the reply ends with "context" if it gets there
            if self.context_policy == "refuse" or not self._can_drop(path):
                raise ContextOverflowError(
                    f"the conversation needs {len(ids)} tokens with the chat template, more than the "
                    f"context window of {limit} tokens allows; start a new chat, edit or clear it, or use "
                    f"context_policy='drop_oldest'"
                )
            self._drop_oldest_turn(path)

    def _path_to(self, node: _Node) -> list[_Node]:
        path = self._path()
        return path[: path.index(node) + 1]

    @staticmethod
    def _can_drop(path: list[_Node]) -> bool:
        return any(n.role == "user" for n in path[1:])

    def _drop_oldest_turn(self, path: list[_Node]) -> None:
        """Remove the first user message and the replies up to the next user message."""
        j = next(i for i in range(1, len(path)) if path[i].role == "user")
        self.dropped.extend({"role": n.role, "content": n.content} for n in path[:j])
        self._root.children, self._root.active = [path[j]], 0

    def _reuse_cache(self, ids: list[int], draft: Optional[nn.Module] = None) -> list[int]:
        """Trim the cache to its common prefix with `ids`; return the ids still to prefill.

        With a draft model, its cache is brought to the same tokens (prefilling what it lacks).
        """
        if self._cache is None:
            self._cache, self._cache_tokens = make_prompt_cache(self.model), []
        k = min(_common_prefix(self._cache_tokens, ids), len(ids) - 1)  # prefill at least one token
        self._trim_to(k)
        if draft is not None:
            if self._draft_of is not draft or self._draft_cache is None:
                self._draft_cache, self._draft_of = make_prompt_cache(draft), draft
            k = len(self._cache_tokens)
            held = self._draft_cache[0].offset
            if held < k:
                prefill_prompt_cache(draft, self.tokenizer, ids[held:k], self._draft_cache, **self.kv_settings)
        return ids[len(self._cache_tokens) :]

    def export_cache(self) -> tuple[Optional[list], list[int]]:
        """The KV cache (None before the first reply) and a copy of the token ids it holds, to save.

        The cache is the live one, not a copy: write it out before the next turn changes it.
        """
        self._check_idle()
        return self._cache, list(self._cache_tokens)

    def clear_cache(self) -> None:
        """Drop the KV cache (its memory is freed); the next turn prefills the whole history."""
        self._check_idle()
        self._cache, self._cache_tokens, self._draft_cache, self._draft_of = None, [], None, None

    def adopt_cache(self, cache: list, tokens: list[int]) -> None:
        """Use a cache loaded from disk (see generation/cache_store.py) that holds exactly `tokens`.

        It replaces the chat's own cache; the next turn's prefix diff decides how much of it is
        reused, so a cache that shares little with the history costs a trim, never a wrong reply.
        """
        self._check_idle()
        layers = len(make_prompt_cache(self.model)) if self._cache is None else len(self._cache)
        held = getattr(cache[0], "offset", None) if cache else None
        if len(cache) != layers or held != len(tokens):
            raise ValueError(
                f"the cache ({len(cache)} layers holding {held} tokens) does not fit this chat "
                f"({layers} layers) and its {len(tokens)} token ids"
            )
        self._cache, self._cache_tokens = cache, [int(t) for t in tokens]
        self._draft_cache = self._draft_of = None  # the draft's cache held the old tokens

    def _trim_to(self, k: int) -> None:
        extra = len(self._cache_tokens) - k
        if extra > 0:
            if can_trim_prompt_cache(self._cache):
                trim_prompt_cache(self._cache, extra)
                self._cache_tokens = self._cache_tokens[:k]
            else:
                self._cache, self._cache_tokens = make_prompt_cache(self.model), []
        if self._draft_cache is not None:
            extra = self._draft_cache[0].offset - len(self._cache_tokens)
            if extra > 0:
                trim_prompt_cache(self._draft_cache, extra)

    def _sync_cache(self, held: list[int]) -> None:
        """After a turn: keep only the cached tokens that the rendered history agrees with.

        `held` is the prompt plus the tokens seen; an exception inside a decode step can leave
        one more (unseen) token in the cache, which is trimmed first.
        """
        offset = getattr(self._cache[0], "offset", len(held)) if self._cache else 0
        self._cache_tokens = held[:offset] + [-1] * (offset - len(held))
        if self._draft_cache is not None and self._draft_cache[0].offset > len(held):
            trim_prompt_cache(self._draft_cache, self._draft_cache[0].offset - len(held))
        history = self._tokens(self.messages, False)
        self._trim_to(_common_prefix(self._cache_tokens, history))

    # --- KV-cache quantization -------------------------------------------------------------------
    @property
    def kv_settings(self) -> dict:
        """`kv_bits`, `kv_group_size`, `quantized_kv_start` as given (kv_bits None: a float cache)."""
        kv = self.kv_quantization
        return kv.to_dict() if kv is not None else {"kv_bits": None, "kv_group_size": 64, "quantized_kv_start": 0}

    def set_kv_quantization(self, kv_bits: Optional[int], kv_group_size: int = 64, quantized_kv_start: int = 0) -> bool:
        """Change the KV-cache quantization; a cache built otherwise is dropped (the next turn prefills
        the history again). Returns whether it changed."""
        self._check_idle()
        kv = KVQuantization.make(kv_bits, kv_group_size, quantized_kv_start, self.model)
        if kv == self.kv_quantization:
            return False
        self.kv_quantization = kv
        self._cache, self._cache_tokens, self._draft_cache, self._draft_of = None, [], None, None
        return True

    # --- generation ----------------------------------------------------------------------------
    def _check_idle(self) -> None:
        if self._busy is not None:
            raise RuntimeError("a reply is still being generated: finish the stream or close() it first")

    def _settings(self, overrides: dict) -> dict:
        _check_settings(overrides, SAMPLING_KEYS + CALL_ONLY_KEYS)
        _check_settings(self.sampling, SAMPLING_KEYS)
        settings = {**self.sampling, **overrides}
        settings.setdefault("max_tokens", None)
        return settings

    def stream(self, text: str, cancel: Any = None, **kw: Any) -> ReplyStream:
        """Send a user message and stream the reply; the last response carries `finish_reason`.

        A reply cut short (cancel event, closing the iterator, Ctrl-C) keeps its partial text in
        the history with finish reason "cancelled". Raises ContextOverflowError (the message is
        not added) when the conversation does not fit and the policy is "refuse".
        """
        self._check_idle()
        if not isinstance(text, str):
            raise TypeError("the message must be a string")
        settings = self._settings(kw)
        leaf = self._leaf()
        node = self._append(leaf, _Node("user", render_message(self.attachments, text)))
        try:
            ids = self._fit(node, settings["max_tokens"])
        except BaseException:
            leaf.children.remove(node)
            leaf.active = max(len(leaf.children) - 1, 0)
            raise
        self.attachments = []  # sent: they are part of the message now
        return self._reply(node, ids, cancel, settings)

    def attach(self, path: Union[str, Path, Attachment]) -> Attachment:
        """Read a file, folder or PDF (attachments.py); its text goes before the next message sent."""
        attachment = path if isinstance(path, Attachment) else read_attachment(path)
        self.attachments.append(attachment)
        return attachment

    def send(self, text: str, **kw: Any) -> Reply:
        """Send a user message and return the whole reply (a str with `.finish_reason`, `.stats`)."""
        return self._collect(self.stream(text, **kw))

    def regenerate(self, cancel: Any = None, **kw: Any) -> ReplyStream:
        """Stream a new reply to the last user message; an old reply stays reachable as a branch."""
        self._check_idle()
        settings = self._settings(kw)
        path = self._path()
        users = [n for n in path if n.role == "user"]
        if not users:
            raise ValueError("there is no user message to answer: send one first")
        node = users[-1]
        if path.index(node) < len(path) - 2:
            raise ValueError(
                "regenerate answers the last user message, which must end the chat or be followed by one reply"
            )
        ids = self._fit(node, settings["max_tokens"])
        return self._reply(node, ids, cancel, settings)

    @staticmethod
    def _collect(responses: Iterator[GenerationResponse]) -> Reply:
        parts, last = [], None
        for last in responses:
            parts.append(last.text)
        return Reply("".join(parts), last.finish_reason if last else "cancelled", GenerationStats.from_response(last))

    def _reply(self, parent: _Node, ids: list[int], cancel: Any, settings: dict) -> ReplyStream:
        stream = ReplyStream(self)
        stream._gen = self._run(parent, ids, cancel, settings, stream)
        self._busy = stream
        return stream

    def _release(self, stream: ReplyStream) -> None:
        if self._busy is stream:
            self._busy = None

    def _run(
        self, parent: _Node, ids: list[int], cancel: Any, settings: dict, stream: ReplyStream
    ) -> Iterator[GenerationResponse]:
        parts: list[str] = []
        generated: list[int] = []
        last: Optional[GenerationResponse] = None
        recorded = False

        run_cache: list = []

        def take_back() -> None:
            # generation may have swapped layers for quantized ones in the list it was given
            if run_cache:
                n = len(self._cache)
                self._cache, rest = run_cache[:n], run_cache[n:]
                if rest:
                    self._draft_cache = rest

        def record(reason: str) -> None:
            nonlocal recorded
            take_back()
            recorded = True
            text = "".join(parts)
            if text or reason != "cancelled":
                stats = GenerationStats.from_response(last).to_dict()
                self._append(parent, _Node("assistant", text, finish_reason=reason, stats=stats))
            self._sync_cache(ids + generated)

        responses = None
        try:
            lookup = settings.pop("lookup", self.lookup)
            draft = self.draft_model if not lookup else None
            suffix = self._reuse_cache(ids, draft)
            self.last_cached_tokens = len(ids) - len(suffix)
            max_tokens = settings.pop("max_tokens")
            spec = {"lookup": lookup, "context_tokens": ids[: len(ids) - len(suffix)]} if lookup else {}
            if draft is not None:
                spec = {"draft_model": draft, "num_draft_tokens": self.num_draft_tokens}
            run_cache = self._cache + (self._draft_cache if draft is not None else [])
            self._checkpoint_hook(settings, run_cache, ids)
            responses = stream_generate(
                self.model,
                self.tokenizer,
                suffix,
                max_tokens,
                prompt_cache=run_cache,
                cancel=cancel,
                max_context=self.context_limit,
                **self.kv_settings,
                **spec,
                **settings,
            )
            for r in responses:
                parts.append(r.text)
                if r.generation_tokens > len(generated):
                    generated.append(r.token)
                last = r
                if r.finish_reason is not None:
                    record(r.finish_reason)  # before the last yield: the history is final when it arrives
                yield r
        except (GeneratorExit, KeyboardInterrupt):
            if not recorded:
                record("cancelled")
            raise
        except BaseException:
            if self._cache is not None and not recorded:
                take_back()
                self._sync_cache(ids + generated)
            raise
        finally:
            if responses is not None:
                responses.close()
            take_back()
            self._release(stream)

    def _checkpoint_hook(self, settings: dict, run_cache: list, ids: list[int]) -> None:
        """`checkpoint=` (a call-only setting, e.g. checkpoint.Checkpointer) is called after each prefill
        step with the model's cache layers and the prompt ids they hold, to save a long read as it goes."""
        checkpoint, report = settings.pop("checkpoint", None), settings.get("prompt_progress_callback")
        if checkpoint is None:
            return
        layers = len(self._cache)

        def progress(done: int, total: int) -> None:
            if report is not None:
                report(done, total)
            held = getattr(run_cache[0], "offset", 0)
            if done < total and 0 < held <= len(ids):  # while reading, not once decoding has begun
                checkpoint(run_cache[:layers], ids[:held])

        settings["prompt_progress_callback"] = progress

    # --- save / load ---------------------------------------------------------------------------
    def save(self, path: Union[str, Path], include_cache: bool = False) -> None:
        """Write the chat (messages, branches, settings) as JSON; optionally the KV cache beside it.

        The cache goes to `<name>.kv.safetensors` next to the JSON file, tagged with the model's
        long-context settings. Both files are written under temporary names and then renamed.
        """
        self._check_idle()
        path = Path(path)
        data = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "system": self.system,
            "context_policy": self.context_policy,
            "max_context": self.max_context,
            "sampling": self._json_sampling(),
            "messages": [c.to_dict() for c in self._root.children],
            "active": self._root.active,
            "dropped": self.dropped,
            "kv_cache": self.kv_settings,
            "cache": None,
        }
        if include_cache and self._cache is not None and self._cache_tokens:
            cache_path = path.with_name(path.stem + ".kv.safetensors")
            save_prompt_cache(cache_path, self._cache, model=self.model)
            data["cache"] = {"file": cache_path.name, "tokens": list(self._cache_tokens)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _json_sampling(self) -> dict:
        out = dict(self.sampling)
        if out.get("logit_bias"):
            out["logit_bias"] = {str(k): v for k, v in out["logit_bias"].items()}
        try:
            json.dumps(out)
        except TypeError as e:
            raise TypeError(f"chat.sampling must hold plain values to be saved ({e})") from None
        return out

    @classmethod
    def load(cls, path: Union[str, Path], model: nn.Module, tokenizer) -> Chat:
        """Read a chat written by `save`; its KV cache too when one was saved with it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ChatFileError(f"{path}: no such chat file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatFileError(f"{path}: not valid JSON ({e})") from None

        def bad(field_name: str, problem: str) -> ChatFileError:
            return ChatFileError(f"{path}: field '{field_name}': {problem}")

        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise ChatFileError(f'{path}: not a qwen2-mlx chat file (no "format": "{FILE_FORMAT}")')
        if data.get("version") != FILE_VERSION:
            raise bad("version", f"{data.get('version')!r} is not supported (expected {FILE_VERSION})")
        sampling = data.get("sampling") or {}
        if not isinstance(sampling, dict) or any(k not in SAMPLING_KEYS for k in sampling):
            raise bad("sampling", f"must be an object with keys among {', '.join(SAMPLING_KEYS)}")
        if sampling.get("logit_bias"):
            try:
                sampling["logit_bias"] = {int(k): float(v) for k, v in sampling["logit_bias"].items()}
            except (ValueError, TypeError, AttributeError):
                raise bad("sampling.logit_bias", "must map token ids to numbers") from None
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise bad("system", "must be a string or null")
        kv = data.get("kv_cache") or {}
        if not isinstance(kv, dict) or any(k not in ("kv_bits", "kv_group_size", "quantized_kv_start") for k in kv):
            raise bad("kv_cache", "must be an object with keys among kv_bits, kv_group_size, quantized_kv_start")
        try:
            chat = cls(
                model,
                tokenizer,
                system=system,
                context_policy=data.get("context_policy", "refuse"),
                max_context=data.get("max_context"),
                **kv,
                **sampling,
            )
        except (ValueError, TypeError) as e:
            raise ChatFileError(f"{path}: {e}") from None
        chat._root.children = [
            cls._node_from(m, path, f"messages[{i}]") for i, m in enumerate(data.get("messages") or [])
        ]
        chat._root.active = cls._active_from(data, len(chat._root.children), path, "active")
        dropped = data.get("dropped") or []
        for i, m in enumerate(dropped):
            try:
                cls._validate_message(m, f"dropped[{i}]")
            except ValueError as e:
                raise ChatFileError(f"{path}: {e}") from None
        chat.dropped = list(dropped)
        cache = data.get("cache")
        if cache:
            if (
                not isinstance(cache, dict)
                or not isinstance(cache.get("file"), str)
                or not isinstance(cache.get("tokens"), list)
            ):
                raise bad("cache", "must be an object with 'file' and 'tokens'")
            cache_path = path.with_name(cache["file"])
            kv = load_prompt_cache(cache_path, model=model)  # raises PromptCacheError naming the file
            if getattr(kv[0], "offset", None) != len(cache["tokens"]):
                raise PromptCacheError(
                    f"{cache_path}: holds {getattr(kv[0], 'offset', '?')} tokens, {path} lists {len(cache['tokens'])}"
                )
            chat._cache, chat._cache_tokens = kv, [int(t) for t in cache["tokens"]]
        return chat

    @staticmethod
    def _active_from(d: dict, n: int, path: Path, where: str) -> int:
        active = d.get("active", 0)
        if not isinstance(active, int) or not (0 <= active < max(n, 1)):
            raise ChatFileError(f"{path}: field '{where}': {active!r} is not an index of the {n} alternatives")
        return active

    @classmethod
    def _node_from(cls, d: Any, path: Path, where: str) -> _Node:
        try:
            role, content = cls._validate_message(d, where)
        except ValueError as e:
            raise ChatFileError(f"{path}: {e}") from None
        if role == "system":
            raise ChatFileError(f"{path}: {where}: the system prompt belongs in the 'system' field")
        children = d.get("children") or []
        if not isinstance(children, list):
            raise ChatFileError(f"{path}: field '{where}.children': must be a list")
        node = _Node(role, content, finish_reason=d.get("finish_reason"), stats=d.get("stats"))
        node.children = [cls._node_from(c, path, f"{where}.children[{i}]") for i, c in enumerate(children)]
        node.active = cls._active_from(d, len(node.children), path, f"{where}.active")
        return node
