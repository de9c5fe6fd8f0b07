"""Speculative decoding: propose tokens (prompt lookup or a draft model), verify them in one forward.

Exactness: with greedy sampling a proposal is kept only where it equals the model's argmax, so the
text is plain decoding's. With temperature > 0 and the built-in sampler, proposals are accepted
with probability min(1, p/q) and a rejection resamples from max(p - q, 0) normalized (Leviathan et
al. 2023, Chen et al. 2023), which leaves the output distribution the model's own; prompt lookup's
q is one-hot. A custom sampler gets mlx-lm's rule: sample the model at every position and keep a
proposal only where it equals the sample (exact for any sampler, fewer acceptances).

Cache discipline: after every verify step the model's cache holds exactly the tokens committed so
far; on any exit (stop, close, exception) both caches are trimmed back to the tokens the caller has
seen, so a chat can keep using them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

from .prompt_cache import can_trim_prompt_cache, trim_prompt_cache
from .proposers import AdaptiveLength, DraftProposer, LookupSettings, NgramIndex


@dataclass
class SpeculativeStats:
    """Counters of one generation: tokens proposed, proposals accepted, forward passes of the model."""

    proposed: int = 0
    accepted: int = 0
    forwards: int = 0


def make_distribution(temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> Callable:
    """The distribution mlx-lm's `make_sampler` draws from, as probabilities over the last axis."""
    methods = []
    if 0 < top_p < 1.0:
        methods.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        methods.append(lambda x: apply_min_p(x, min_p, 1))
    if top_k > 0:
        methods.append(lambda x: apply_top_k(x, top_k))

    def distribution(logprobs: mx.array) -> mx.array:
        for m in methods:
            logprobs = m(logprobs)
        return mx.softmax(logprobs * (1.0 / temperature), axis=-1)

    return distribution


def _trim_to(cache: list, keep: int) -> None:
    extra = cache[0].offset - keep
    if extra > 0:
        trim_prompt_cache(cache, extra)


def split_cache(cache: list, model: nn.Module, draft_model: Optional[nn.Module]) -> tuple[list, Optional[list]]:
    """mlx-lm's layout: with a draft model, the prompt cache is the model's layers then the draft's."""
    if draft_model is None:
        return cache, None
    n, m = len(model.layers), len(draft_model.layers)
    if len(cache) != n + m:
        raise ValueError(
            f"with a draft model the prompt cache holds the model's {n} layers then the draft's {m} "
            f"(make_prompt_cache(model) + make_prompt_cache(draft_model)), not {len(cache)}"
        )
    main, draft = cache[:n], cache[n:]
    if main[0].offset != draft[0].offset:
        raise ValueError(
            f"the draft's cache holds {draft[0].offset} tokens and the model's {main[0].offset}: they must be equal"
        )
    return main, draft


class _Verifier:
    """Turns the model's logits at the k+1 verified positions into (accepted count, next token)."""

    def __init__(self, sampler: Optional[Callable], processors: Sequence[Callable], distribution: Optional[Callable]):
        self.sampler = sampler
        self.processors = list(processors or [])
        self.distribution = distribution
        self.greedy = sampler is None or sampler is greedy_sampler
        self.history: Optional[mx.array] = None  # what the logits processors see, as in generate_step

    def logprobs(self, logits: mx.array, inputs: mx.array) -> mx.array:
        if self.processors:
            rows = []
            for i in range(inputs.size):
                hist = inputs[: i + 1] if self.history is None else mx.concatenate([self.history, inputs[: i + 1]])
                row = logits[i : i + 1]
                for proc in self.processors:
                    row = proc(hist, row)
                rows.append(row)
            logits = mx.concatenate(rows)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def commit(self, inputs: mx.array, n: int) -> None:
        if self.processors:
            kept = inputs[:n]
            self.history = kept if self.history is None else mx.concatenate([self.history, kept])

    def accept(self, logprobs: mx.array, idx: mx.array, q: Optional[mx.array]) -> tuple[int, int, list[int]]:
        """(accepted count, the model's next token, the proposals as ints) from one evaluation."""
        k = idx.size
        if self.greedy or (self.distribution is None and self.sampler is None):
            targets = mx.argmax(logprobs, axis=-1)
            mx.eval(targets, idx)
            return _agree(targets.tolist(), idx.tolist())
        if self.distribution is None:  # a custom sampler: sample each position, keep proposals it matches
            targets = mx.concatenate([self.sampler(logprobs[i : i + 1]).reshape(-1) for i in range(k + 1)])
            mx.eval(targets, idx)
            return _agree(targets.tolist(), idx.tolist())
        p = self.distribution(logprobs)  # (k+1, V)
        if k == 0:
            return 0, mx.random.categorical(mx.log(p[0])).item(), []
        p_d = mx.take_along_axis(p[:k], idx[:, None], axis=-1)[:, 0]
        q_d = mx.ones(k) if q is None else mx.take_along_axis(q, idx[:, None], axis=-1)[:, 0]
        ok = mx.random.uniform(shape=(k,)) < mx.minimum(p_d / q_d, 1.0)
        mx.eval(ok, idx)
        proposals = idx.tolist()
        a = next((i for i, good in enumerate(ok.tolist()) if not good), k)
        if a == k:
            return k, mx.random.categorical(mx.log(p[k])).item(), proposals
        if q is None:  # one-hot q: the residual is p without the rejected token
            residual = p[a] * (mx.arange(p.shape[-1]) != proposals[a])
        else:
            qa = q[a]
            if qa.shape[-1] < p.shape[-1]:  # a draft with a smaller (padded) embedding
                qa = mx.concatenate([qa, mx.zeros(p.shape[-1] - qa.shape[-1], qa.dtype)])
            residual = mx.maximum(p[a] - qa, 0.0)
        return a, mx.random.categorical(mx.log(residual)).item(), proposals


def _agree(targets: list[int], proposals: list[int]) -> tuple[int, int, list[int]]:
    a = 0
    while a < len(proposals) and proposals[a] == targets[a]:
        a += 1
    return a, targets[a], proposals


def _propose(k: int, index: Optional[NgramIndex], drafter: Optional[DraftProposer], tail: list[int]):
    """(up to k proposed tokens, the draft's distributions or None): from the n-gram index or the draft."""
    if k and index is not None:
        return mx.array(index.propose(k), dtype=mx.uint32), None
    if k and drafter is not None:
        return drafter.propose(tail, k)  # `tail`: what the draft's cache does not hold yet
    return mx.array([], dtype=mx.uint32), None


def _proposers(lookup, context: list[int], draft_model, draft_cache, distribution) -> tuple:
    """(n-gram index, adaptive length, draft proposer): the first two for prompt lookup, the last for a draft."""
    if lookup is not None:
        return NgramIndex(lookup, context), AdaptiveLength(lookup), None
    if draft_model is not None:
        return None, None, DraftProposer(draft_model, draft_cache, distribution)
    return None, None, None


def _proposal_length(max_tokens: Optional[int], n: int, adaptive: Optional[AdaptiveLength], fixed: int) -> int:
    """How many tokens to propose: the adaptive or fixed length, never past `max_tokens`."""
    room = None if max_tokens is None else max_tokens - n - 1
    if room is not None and room <= 0:
        return 0
    k = adaptive.next() if adaptive is not None else fixed
    return k if room is None else min(k, room)


def _keep(cache: list, draft_cache: Optional[list], upto: int, quantize: Callable[[list], None] = lambda c: None):
    """Trim the model's cache to `upto` positions and the draft's no further, then quantize them."""
    _trim_to(cache, upto)
    quantize(cache)
    if draft_cache is not None:
        _trim_to(draft_cache, min(draft_cache[0].offset, upto))
        quantize(draft_cache)


def speculative_generate_step(
    prompt: mx.array,
    model: nn.Module,
    cache: list,
    *,
    prefill: Callable[[nn.Module, mx.array, list], int],
    max_tokens: Optional[int],
    sampler: Optional[Callable] = None,
    logits_processors: Optional[Sequence[Callable]] = None,
    distribution: Optional[Callable] = None,
    draft_model: Optional[nn.Module] = None,
    draft_cache: Optional[list] = None,
    num_draft_tokens: int = 3,
    lookup: Optional[LookupSettings] = None,
    context_tokens: Sequence[int] = (),
    stats: Optional[SpeculativeStats] = None,
    on_first: Callable[[], None] = lambda: None,
    quantize: Callable[[list], None] = lambda cache: None,
) -> Generator[tuple[int, mx.array, bool], None, None]:
    """Yield (token, logprobs, from_draft) like mlx-lm's speculative_generate_step.

    `prefill(model, tokens, cache)` runs tokens into a cache (generate.py's chunked prefill);
    `context_tokens` are the tokens `cache` held before `prompt` (prompt lookup searches them too).
    `quantize(cache)` quantizes layers in place (kv_quant.py) after each verify step.
    """
    if not all(can_trim_prompt_cache(c) for c in (cache, draft_cache) if c is not None):
        raise ValueError("speculative decoding needs trimmable KV caches")
    stats = stats if stats is not None else SpeculativeStats()
    verifier = _Verifier(sampler, logits_processors or [], distribution)
    prompt_list = [int(t) for t in prompt.tolist()]
    index, adaptive, drafter = _proposers(lookup, list(context_tokens) + prompt_list, draft_model, draft_cache, (
        None if verifier.greedy else distribution
    ))  # fmt: skip

    done = prefill(model, prompt[:-1], cache)
    if drafter is not None:
        prefill(draft_model, prompt[:-1], draft_cache)
    if verifier.processors and done:
        verifier.history = prompt[:done]
    seq = prompt_list[done:]  # seq[0] is the token to feed next; later ones are generated
    origin = cache[0].offset  # seq[i] goes to position origin + i
    good = origin  # the model's cache positions holding committed tokens
    n = 0
    try:
        while True:
            k = _proposal_length(max_tokens, n, adaptive, num_draft_tokens)
            idx, q = _propose(k, index, drafter, seq[draft_cache[0].offset - origin :] if drafter else seq)
            k, inputs = idx.size, mx.concatenate([mx.array(seq[-1:], dtype=mx.uint32), idx])  # y, then proposals
            logits = model(inputs[None], cache=cache)[0]
            logprobs = verifier.logprobs(logits, inputs)
            a, token, proposals = verifier.accept(logprobs, idx, q)
            stats.forwards, stats.proposed = stats.forwards + 1, stats.proposed + k
            if adaptive is not None:
                adaptive.update(k, a)
            if n == 0:
                on_first()
            # Keep y and the accepted proposals; the rest of this forward's keys go.
            _keep(cache, draft_cache, good + 1 + a, quantize)
            verifier.commit(inputs, 1 + a)
            good += 1  # y
            for i in range(a):
                seq.append(proposals[i])
                if index is not None:
                    index.extend(proposals[i : i + 1])
                stats.accepted += 1
                n += 1
                good += 1  # seen once yielded: a stop here keeps it, as plain decoding would
                yield proposals[i], logprobs[i], True
            seq.append(token)
            if index is not None:
                index.extend([token])
            n += 1
            yield token, logprobs[a], False
            if max_tokens is not None and n >= max_tokens:
                return
            if stats.forwards % 256 == 0:
                mx.clear_cache()
    finally:
        # Whatever ended us, keep only tokens the caller has seen (and the draft no further).
        _keep(cache, draft_cache, good)
