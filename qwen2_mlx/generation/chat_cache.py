"""The bookkeeping of a chat's KV caches: which token ids the model's cache holds, and the draft's.

`ChatCaches.tokens` is exactly what `cache` holds, so a turn prefills only the suffix its prompt does
not share with them (longest common prefix of token ids), after trimming the cache back to that
prefix. A draft model's cache (speculative decoding) holds a prefix of the same tokens and is
rebuilt for another draft model.
"""

from __future__ import annotations

from typing import Optional

import mlx.nn as nn

from .generate import prefill_prompt_cache
from .prompt_cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache


def common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatCaches:
    """The model's cache with the ids it holds, and the draft model's cache (None until one runs)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache: Optional[list] = None
        self.tokens: list[int] = []  # exactly the token ids `cache` holds
        self.draft_cache: Optional[list] = None
        self.draft_of: Optional[nn.Module] = None

    def clear(self) -> None:
        """Drop both caches (their memory is freed)."""
        self.cache, self.tokens, self.draft_cache, self.draft_of = None, [], None, None

    def reuse(self, ids: list[int], draft: Optional[nn.Module], tokenizer, kv: dict) -> list[int]:
        """Trim the cache to its common prefix with `ids`; return the ids still to prefill.

        With a draft model, its cache is brought to the same tokens (prefilling what it lacks).
        """
        if self.cache is None:
            self.cache, self.tokens = make_prompt_cache(self.model), []
        self.trim_to(min(common_prefix(self.tokens, ids), len(ids) - 1))  # prefill at least one token
        if draft is not None:
            if self.draft_of is not draft or self.draft_cache is None:
                self.draft_cache, self.draft_of = make_prompt_cache(draft), draft
            k = len(self.tokens)
            held = self.draft_cache[0].offset
            if held < k:
                prefill_prompt_cache(draft, tokenizer, ids[held:k], self.draft_cache, **kv)
        return ids[len(self.tokens) :]

    def trim_to(self, k: int) -> None:
        extra = len(self.tokens) - k
        if extra > 0:
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, extra)
                self.tokens = self.tokens[:k]
            else:
                self.cache, self.tokens = make_prompt_cache(self.model), []
        if self.draft_cache is not None:
            extra = self.draft_cache[0].offset - len(self.tokens)
            if extra > 0:
                trim_prompt_cache(self.draft_cache, extra)

    def run_list(self, draft: Optional[nn.Module]) -> list:
        """The list a run generates into: mlx-lm's layout, the model's layers then the draft's."""
        return self.cache + (self.draft_cache if draft is not None else [])

    def take_back(self, run_list: list) -> None:
        """Generation may have swapped layers for quantized ones in the list it was given."""
        if run_list:
            n = len(self.cache)
            self.cache, rest = run_list[:n], run_list[n:]
            if rest:
                self.draft_cache = rest

    def sync(self, held: list[int], history: list[int]) -> None:
        """After a turn: keep only the cached tokens that the rendered `history` agrees with.

        `held` is the prompt plus the tokens seen; an exception inside a decode step can leave
        one more (unseen) token in the cache, which is trimmed first.
        """
        offset = getattr(self.cache[0], "offset", len(held)) if self.cache else 0
        self.tokens = held[:offset] + [-1] * (offset - len(held))
        if self.draft_cache is not None and self.draft_cache[0].offset > len(held):
            trim_prompt_cache(self.draft_cache, self.draft_cache[0].offset - len(held))
        self.trim_to(common_prefix(self.tokens, history))

    def adopt(self, cache: list, tokens: list[int]) -> None:
        """Use a cache loaded from disk that holds exactly `tokens` (checked against the model's layers)."""
        layers = len(make_prompt_cache(self.model)) if self.cache is None else len(self.cache)
        held = getattr(cache[0], "offset", None) if cache else None
        if len(cache) != layers or held != len(tokens):
            raise ValueError(
                f"the cache ({len(cache)} layers holding {held} tokens) does not fit this chat "
                f"({layers} layers) and its {len(tokens)} token ids"
            )
        self.cache, self.tokens = cache, [int(t) for t in tokens]
        self.draft_cache = self.draft_of = None  # the draft's cache held the old tokens
