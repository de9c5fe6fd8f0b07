"""Speculative decoding on tiny models: exact greedy text, exact sampling, caches in step, bad input."""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest
from api_support import tiny_model

from qwen2_mlx import generate_step, load, stream_generate
from qwen2_mlx.generation.prompt_cache import make_prompt_cache
from qwen2_mlx.generation.proposers import AdaptiveLength, LookupSettings, NgramIndex

PROMPT = "The quick brown fox jumps over the lazy dog. Hello, how are you? I am fine, thank you. The quick"
N = 48


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another random model with the same tokenizer: a draft that is often wrong."""
    model, _, _ = tiny_model(tmp_path_factory, seed=1)
    return model


@pytest.fixture(scope="module")
def plain(mt):
    model, tok = mt
    return [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=N)]


def ids(tok, text=PROMPT):
    return tok.encode(text, add_special_tokens=False)


def tokens(model, tok, prompt=PROMPT, **kw):
    rs = list(stream_generate(model, tok, prompt, **kw))
    return [r.token for r in rs if r.generation_tokens], rs


def oracle(tok, plain_ids, prompt=PROMPT):
    """Context for prompt lookup that contains the prompt followed by the right answer: long accepted runs."""
    return ids(tok, prompt) + plain_ids


# --- unit pieces -------------------------------------------------------------------------------
def test_ngram_index_proposes_the_latest_longest_match():
    index = NgramIndex(LookupSettings(ngram_min=1, ngram_max=3), [1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3])
    assert index.propose(3) == [4, 9, 2]  # "1 2 3" (longest) beats "2 3" (more recent)
    index = NgramIndex(LookupSettings(ngram_min=2, ngram_max=2), [5, 1, 2, 9, 1, 2, 7, 8, 1, 2])
    assert index.propose(5) == [7, 8, 1, 2]  # the latest earlier "1 2", cut at the end of the text
    index = NgramIndex(LookupSettings(ngram_min=2, ngram_max=3), [7, 8, 9])
    assert index.propose(4) == []


def test_adaptive_rule_shrinks_then_pauses_then_grows():
    rule = AdaptiveLength(LookupSettings(num_tokens=8, pause_after=2, max_pause=4))
    assert rule.next() == 8
    rule.update(8, 2)
    assert rule.next() == 3
    rule.update(3, 0)
    rule.update(1, 0)  # two misses in a row: pause
    assert [rule.next() for _ in range(3)] == [0, 0, 1]
    rule.update(1, 1)
    assert rule.next() == 2


# --- greedy: token for token plain decoding ------------------------------------------------------
@pytest.mark.parametrize(
    "lookup",
    [True, LookupSettings(ngram_min=1, ngram_max=2, num_tokens=3), {"adaptive": False, "num_tokens": 6}],
)
def test_lookup_greedy_equals_plain(mt, plain, lookup):
    model, tok = mt
    got, rs = tokens(model, tok, max_tokens=N, lookup=lookup)
    assert got == plain
    assert rs[-1].forward_passes >= 1 and rs[-1].finish_reason == "length"


def test_lookup_with_oracle_context_accepts_long_runs(mt, plain):
    model, tok = mt
    got, rs = tokens(model, tok, max_tokens=N, lookup=True, context_tokens=oracle(tok, plain))
    assert got == plain
    last = rs[-1]
    assert last.accepted_tokens > N // 2 and last.forward_passes < N // 2
    assert sum(r.from_draft for r in rs) == last.accepted_tokens


def test_lookup_with_wrong_context_rejects_and_stays_exact(mt, plain):
    model, tok = mt
    wrong = [(t * 7 + 3) % 500 for t in plain]
    got, rs = tokens(model, tok, max_tokens=N, lookup={"ngram_min": 1}, context_tokens=ids(tok) + wrong)
    assert got == plain
    assert rs[-1].proposed_tokens > rs[-1].accepted_tokens


@pytest.mark.parametrize("limit", [5, 17, 30])
def test_max_tokens_inside_an_accepted_run(mt, plain, limit):
    model, tok = mt
    got, rs = tokens(model, tok, max_tokens=limit, lookup=True, context_tokens=oracle(tok, plain))
    assert got == plain[:limit] and rs[-1].finish_reason == "length"
    # The run that reached the limit was cut to fit it: proposals up to the limit, then the model's token.
    assert rs[-2].from_draft and not rs[-1].from_draft and rs[-1].forward_passes < limit


def test_context_limit_inside_an_accepted_run(mt, plain):
    model, tok = mt
    window = len(ids(tok)) + 23
    got, rs = tokens(model, tok, max_tokens=None, max_context=window, lookup=True, context_tokens=oracle(tok, plain))
    assert got == plain[:23] and rs[-1].finish_reason == "context" and rs[-1].forward_passes <= 3
    got, rs = tokens(model, tok, max_tokens=None, max_context=window, draft_model=model, num_draft_tokens=5)
    assert got == plain[:23] and rs[-1].finish_reason == "context"


def test_stop_string_inside_an_accepted_run(mt, plain):
    model, tok = mt
    full = "".join(r.text for r in stream_generate(model, tok, PROMPT, max_tokens=N))
    stop = next(
        full[i : i + 3] for i in range(8, len(full) - 3) if full[i : i + 3].strip() and full[i : i + 3] not in full[:i]
    )
    text_plain = "".join(r.text for r in stream_generate(model, tok, PROMPT, max_tokens=N, stop=[stop]))
    rs = list(
        stream_generate(model, tok, PROMPT, max_tokens=N, stop=[stop], lookup=True, context_tokens=oracle(tok, plain))
    )
    assert "".join(r.text for r in rs) == text_plain == full[: full.index(stop)]
    assert rs[-1].finish_reason == "stop" and rs[-1].from_draft


def test_draft_model_greedy_equals_plain(mt, other, plain):
    model, tok = mt
    for draft, k in [(model, 4), (other, 3), (other, 1)]:
        got, rs = tokens(model, tok, max_tokens=N, draft_model=draft, num_draft_tokens=k)
        assert got == plain
    assert rs[-1].proposed_tokens > rs[-1].accepted_tokens  # the other model's proposals get rejected
    got, rs = tokens(model, tok, max_tokens=13, draft_model=model, num_draft_tokens=5)
    assert got == plain[:13] and rs[-1].accepted_tokens == 13 - rs[-1].forward_passes


def test_cancel_inside_an_accepted_run(mt, plain):
    model, tok = mt
    cancel = threading.Event()
    seen = []
    cache = make_prompt_cache(model)
    for r in stream_generate(
        model,
        tok,
        PROMPT,
        max_tokens=N,
        lookup=True,
        context_tokens=oracle(tok, plain),
        cancel=cancel,
        prompt_cache=cache,
    ):
        if r.generation_tokens:
            seen.append(r.token)
        if r.from_draft and len(seen) >= 10:
            cancel.set()
    assert r.finish_reason == "cancelled" and seen == plain[: len(seen)] and 10 <= len(seen) < N
    # The cache holds the prompt and the tokens seen (the last one maybe not fed yet), nothing proposed after them.
    assert len(ids(tok)) + len(seen) - 1 <= cache[0].offset <= len(ids(tok)) + len(seen)


# --- caches ---------------------------------------------------------------------------------------
def reference_cache(model, toks):
    """The cache of plain decoding: the first token as a prompt, then one token per forward."""
    cache = make_prompt_cache(model)
    for t in toks:
        model(mx.array([[t]], dtype=mx.uint32), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def assert_same_cache(cache, ref):
    assert cache[0].offset == ref[0].offset
    n = ref[0].offset
    for c, r in zip(cache, ref):
        assert mx.allclose(c.keys[..., :n, :], r.keys[..., :n, :], atol=1e-4).item()
        assert mx.allclose(c.values[..., :n, :], r.values[..., :n, :], atol=1e-4).item()


def test_cache_after_rejections_equals_plain_decoding(mt, other, plain):
    model, tok = mt
    prompt = mx.array(ids(tok), dtype=mx.uint32)
    wrong = [(t * 7 + 3) % 500 for t in plain]
    for kw in [dict(lookup={"ngram_min": 1}, context_tokens=ids(tok) + wrong), dict(draft_model=other)]:
        cache = make_prompt_cache(model) + (make_prompt_cache(other) if "draft_model" in kw else [])
        out = []
        for token, _, _ in generate_step(prompt, model, max_tokens=20, prompt_cache=cache, **kw):
            out.append(token)
        assert out == plain[:20]
        # The last token is not fed yet, exactly as after plain decoding.
        ref = reference_cache(model, ids(tok) + out[:-1])
        assert_same_cache(cache[: len(model.layers)], ref)
        if "draft_model" in kw:  # the draft's cache holds a prefix of the same tokens
            d = cache[len(model.layers) :]
            assert_same_cache(d, reference_cache(other, (ids(tok) + out)[: d[0].offset]))


def test_dca_model_past_one_chunk(tmp_path_factory):
    _, _, path = tiny_model(tmp_path_factory)
    model, tok = load(path, dca={"chunk_size": 16, "local_size": 4})
    expected, _ = tokens(model, tok, max_tokens=40)
    assert len(ids(tok)) + 40 > 3 * 16  # several chunks
    got, _ = tokens(model, tok, max_tokens=40, lookup=True, context_tokens=oracle(tok, expected))
    assert got == expected
    got, _ = tokens(model, tok, max_tokens=40, draft_model=model, num_draft_tokens=4)
    assert got == expected


def test_dca_temperature_of_a_verify_step_is_each_tokens_own(tmp_path_factory):
    """Past original_max_position_embeddings a verify step of k tokens equals k single decode steps."""
    from qwen2_mlx.models.dca import dca_temperature

    _, _, path = tiny_model(tmp_path_factory)
    L0 = 24
    model, tok = load(path, dca={"chunk_size": 16, "local_size": 4, "original_max_position_embeddings": L0})
    prompt = ids(tok)
    extra = [5, 9, 13, 2, 7]
    assert dca_temperature(len(prompt) + len(extra), L0) > dca_temperature(len(prompt) + 1, L0) > 1.0
    caches = [make_prompt_cache(model) for _ in range(2)]
    for c in caches:
        for layer in c:
            layer.length_hint = len(prompt)  # as generate_step sets it for the prompt
        model(mx.array(prompt)[None], cache=c)
    together = model(mx.array(extra)[None], cache=caches[0])[0]
    alone = mx.concatenate([model(mx.array([[t]]), cache=caches[1])[0] for t in extra])
    assert mx.allclose(together, alone, atol=1e-4, rtol=1e-4).item()
    for a, b in zip(caches[0], caches[1]):
        assert mx.allclose(a.keys[..., : a.offset, :], b.keys[..., : b.offset, :], atol=1e-5).item()
    expected, _ = tokens(model, tok, max_tokens=30)
    got, _ = tokens(model, tok, max_tokens=30, lookup=True, context_tokens=oracle(tok, expected))
    assert got == expected


# --- bad input ------------------------------------------------------------------------------------
def test_bad_settings_are_refused_in_one_line(mt, tmp_path_factory):
    model, tok = mt
    small, _, _ = tiny_model(tmp_path_factory, vocab_size=256)
    with pytest.raises(ValueError, match="vocabulary .*256.* does not match .*512"):
        list(stream_generate(model, tok, PROMPT, max_tokens=4, draft_model=small))
    with pytest.raises(ValueError, match="num_draft_tokens must be a positive integer"):
        list(stream_generate(model, tok, PROMPT, max_tokens=4, draft_model=model, num_draft_tokens=0))
    with pytest.raises(ValueError, match="not both"):
        list(stream_generate(model, tok, PROMPT, max_tokens=4, draft_model=model, lookup=True))
    with pytest.raises(ValueError, match="ngram_min"):
        list(stream_generate(model, tok, PROMPT, max_tokens=4, lookup={"ngram_min": 0}))
    with pytest.raises(ValueError, match="draft's 2"):
        list(
            stream_generate(model, tok, PROMPT, max_tokens=4, draft_model=model, prompt_cache=make_prompt_cache(model))
        )


# --- sampling: the output distribution is the model's ---------------------------------------------
SAMPLES = 2000
TOLERANCE = 0.08  # total-variation distance; plain sampling lands at 0.02-0.04 (16 pairs, 2000 draws)


def exact_pairs(model, prompt, temperature, top_k):
    """The model's exact distribution of the first two sampled tokens, {(t1, t2): p}."""
    from qwen2_mlx.generation.speculative import make_distribution

    dist = make_distribution(temperature, top_k=top_k)

    def next_probs(toks):
        logits = model(mx.array([toks], dtype=mx.uint32))[0, -1:]
        return dist(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]

    p1 = next_probs(prompt)
    out = {}
    for t1 in mx.argsort(-p1)[:top_k].tolist():
        p2 = next_probs(prompt + [t1])
        for t2 in mx.argsort(-p2)[:top_k].tolist():
            out[(t1, t2)] = p1[t1].item() * p2[t2].item()
    return out


def sampled_pairs(model, prompt, n, temperature, top_k, **kw):
    """How often each pair of first tokens comes out of `n` runs (one prefill, caches trimmed back)."""
    from mlx_lm.sample_utils import make_sampler

    from qwen2_mlx.generation.speculative import make_distribution

    draft = kw.get("draft_model")
    cache = make_prompt_cache(model) + (make_prompt_cache(draft) if draft is not None else [])
    counts: dict = {}
    sampler, dist = make_sampler(temperature, top_k=top_k), make_distribution(temperature, top_k=top_k)
    for _ in range(n):
        out = []
        for step in generate_step(
            mx.array(prompt, dtype=mx.uint32),
            model,
            max_tokens=3,
            prompt_cache=cache,
            sampler=sampler,
            distribution=dist,
            **kw,
        ):
            out.append(step[0])
        for c in cache:  # back to empty: every run starts from the same state
            c.trim(c.offset)
        key = tuple(out[:2])
        counts[key] = counts.get(key, 0) + 1
    return {k: v / n for k, v in counts.items()}


def tv(p, q):
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


@pytest.fixture(scope="module")
def near(tmp_path_factory):
    """The tiny model with a perturbed head: a draft that is right part of the time."""
    _, _, path = tiny_model(tmp_path_factory)
    draft, _ = load(path)
    w = draft.lm_head.weight
    draft.lm_head.weight = w + 0.5 * mx.random.normal(w.shape, key=mx.random.key(3)) * w.std()
    mx.eval(draft.parameters())
    return draft


@pytest.mark.parametrize("method", ["draft", "lookup"])
def test_sampled_distribution_is_the_models(mt, near, method):
    model, tok = mt
    prompt = ids(tok)[:12]
    mx.random.seed(0)
    exact = exact_pairs(model, prompt, 1.0, 4)
    if method == "draft":
        kw = dict(draft_model=near, num_draft_tokens=2)
        proposer = exact_pairs(near, prompt, 1.0, 4)
        print("draft vs model", tv(proposer, exact))
        assert tv(proposer, exact) > 3 * TOLERANCE  # accepting the draft's tokens as they come would fail
    else:
        likely = max(exact, key=exact.get)  # propose the most likely pair, then a poor one, from the context
        kw = dict(lookup={"ngram_min": 1, "ngram_max": 1, "adaptive": False}, context_tokens=[prompt[-1], *likely])
    got = sampled_pairs(model, prompt, SAMPLES, 1.0, 4, **kw)
    plain = sampled_pairs(model, prompt, SAMPLES, 1.0, 4)
    assert tv(plain, exact) < TOLERANCE  # the tolerance holds for plain sampling too
    print(f"{method}: TV(speculative, exact) = {tv(got, exact):.3f}, TV(plain, exact) = {tv(plain, exact):.3f}")
    assert tv(got, exact) < TOLERANCE, (tv(got, exact), tv(plain, exact))


def test_yarn_model(tmp_path_factory):
    _, _, path = tiny_model(tmp_path_factory)
    model, tok = load(path, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    expected, _ = tokens(model, tok, max_tokens=40)
    got, _ = tokens(model, tok, max_tokens=40, lookup=True, context_tokens=oracle(tok, expected))
    assert got == expected
    got, _ = tokens(model, tok, max_tokens=40, draft_model=model, num_draft_tokens=4)
    assert got == expected
