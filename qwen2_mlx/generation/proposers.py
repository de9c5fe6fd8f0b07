"""Where speculative tokens come from: prompt lookup (n-grams of the context) and a draft model.

Both propose a few tokens that the target model then checks in one forward pass
(`speculative.py`). Prompt lookup costs nothing but a dictionary lookup; its adaptive rule
shortens and then pauses proposals while they keep being rejected, so free-form text where the
context does not repeat pays (almost) nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn


@dataclass
class LookupSettings:
    """Prompt-lookup settings.

    The longest n-gram (from `ngram_max` down to `ngram_min` tokens) that ends the text so far and
    occurred earlier in the prompt or the reply proposes what followed it there, up to
    `num_tokens` tokens. With `adaptive`, the length follows the accepted run (doubling after a
    fully accepted proposal, the accepted length plus one after a rejection), and after
    `pause_after` proposals in a row rejected at their first token, proposing pauses for 2, 4, ...
    up to `max_pause` steps.
    """

    ngram_max: int = 4
    ngram_min: int = 2
    num_tokens: int = 10
    adaptive: bool = True
    pause_after: int = 2
    max_pause: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(
                f"lookup n-gram sizes need 1 <= ngram_min <= ngram_max (got {self.ngram_min}, {self.ngram_max})"
            )
        if self.num_tokens < 1:
            raise ValueError(f"lookup num_tokens must be at least 1 (got {self.num_tokens})")
        if self.pause_after < 1 or self.max_pause < 0:
            raise ValueError("lookup pause_after must be at least 1 and max_pause at least 0")

    @classmethod
    def coerce(cls, value: Union[None, bool, dict, LookupSettings]) -> Optional[LookupSettings]:
        """`lookup=` as users give it: None/False (off), True (defaults), a dict or settings."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"lookup must be True, False, a dict or LookupSettings, not {type(value).__name__}")


class NgramIndex:
    """The token history and, per n-gram size, where each n-gram was last followed by a token."""

    def __init__(self, settings: LookupSettings, tokens: Sequence[int] = ()):
        self.settings = settings
        self.tokens: list[int] = []
        self._next: dict[int, dict[tuple, int]] = {n: {} for n in range(settings.ngram_min, settings.ngram_max + 1)}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            i = len(self.tokens)
            # The n-grams ending just before position i are now followed by a token: remember where.
            for n, table in self._next.items():
                if i >= n:
                    table[tuple(self.tokens[i - n : i])] = i
            self.tokens.append(int(t))

    def propose(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix n-gram."""
        toks = self.tokens
        for n in range(self.settings.ngram_max, self.settings.ngram_min - 1, -1):
            if len(toks) < n:
                continue
            start = self._next[n].get(tuple(toks[-n:]))
            if start is not None:
                return toks[start : start + k]
        return []


class AdaptiveLength:
    """How many tokens to propose next; see LookupSettings."""

    def __init__(self, settings: LookupSettings):
        self.settings = settings
        self.k = settings.num_tokens
        self.misses = 0
        self.skip = 0

    def next(self) -> int:
        if self.skip > 0:
            self.skip -= 1
            return 0
        return self.k

    def update(self, proposed: int, accepted: int) -> None:
        s = self.settings
        if proposed == 0 or not s.adaptive:
            return
        if accepted == proposed:
            self.k = min(max(2 * self.k, 1), s.num_tokens)
        else:
            self.k = min(accepted + 1, s.num_tokens)
        if accepted == 0:
            self.misses += 1
            if self.misses >= s.pause_after:
                self.skip = min(2 ** (self.misses - s.pause_after + 1), s.max_pause)
        else:
            self.misses = 0


def check_draft(model: nn.Module, draft_model: nn.Module, vocab_size: Optional[int] = None) -> None:
    """Refuse a draft model that cannot propose tokens for `model` (one clear line).

    Qwen2 checkpoints of one family pad the embedding differently (151936 vs 152064 rows) around the
    same tokenizer, so the rule is: the draft's rows fit in the model's, and, when the tokenizer's
    size `vocab_size` is known, both cover it.
    """
    if not hasattr(draft_model, "make_cache") or not hasattr(draft_model, "args"):
        raise TypeError("draft_model must be a model loaded with qwen2_mlx.load (or mlx_lm.load)")
    target, draft = model.args.vocab_size, draft_model.args.vocab_size
    small = vocab_size is not None and min(target, draft) < vocab_size
    if draft > target or small:
        raise ValueError(
            f"the draft model's vocabulary ({draft} tokens) does not match the model's ({target} tokens"
            + (f", tokenizer {vocab_size}" if vocab_size is not None else "")
            + "): speculative decoding needs a draft with the same tokenizer"
        )


def check_draft_tokenizer(tokenizer: Any, draft_tokenizer: Any) -> None:
    """Refuse a draft whose tokenizer maps tokens differently from the model's (one clear line)."""
    a, b = tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if a != b:
        diff = len(set(a.items()) ^ set(b.items()))
        raise ValueError(
            f"the draft model's tokenizer differs from the model's ({len(b)} vs {len(a)} tokens, "
            f"{diff} entries differ): speculative decoding needs a draft with the same tokenizer"
        )


class DraftProposer:
    """Runs a draft model over its own KV cache, which holds the same tokens as the model's.

    `pending` are the tokens the model has accepted that the draft has not seen yet (at least the
    last one); `propose` feeds them, then each proposal but the last, so the draft cache ends one
    token short of the proposals, as mlx-lm's draft loop does.
    """

    def __init__(self, draft_model: nn.Module, cache: list, distribution=None):
        self.model = draft_model
        self.cache = cache
        self.distribution = distribution  # None: greedy proposals; else they are sampled from it

    def propose(self, pending: list[int], k: int) -> tuple[mx.array, Optional[mx.array]]:
        """`k` proposals and, when sampling, the (k, vocab) distributions they were drawn from.

        Both stay lazy: the verify forward is queued behind the draft's without a round trip to Python.
        """
        tokens, dists, inp = [], [], mx.array(pending, dtype=mx.uint32)
        for _ in range(k):
            logits = self.model(inp[None], cache=self.cache)[0, -1:]
            if self.distribution is None:
                y = mx.argmax(logits, axis=-1)
            else:
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                q = self.distribution(logprobs)
                dists.append(q)
                y = mx.random.categorical(mx.log(q))
            y = y.astype(mx.uint32)
            mx.async_eval(y)
            tokens.append(y)
            inp = y
        return mx.concatenate(tokens), (mx.concatenate(dists) if dists else None)
