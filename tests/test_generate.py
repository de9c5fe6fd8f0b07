"""generate / stream_generate: stop strings, finish reasons, cancellation, sampling controls."""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest
from api_support import scripted

from qwen2_mlx import ContextOverflowError, Reply, generate, generate_step, stream_generate
from qwen2_mlx.generation.generate import StopStringFilter

PROMPT = "The quick brown fox jumps over the lazy dog."
SCRIPT_TEXT = "Hello, how are you? I am fine, thank you."


def script_ids(tokenizer, text=SCRIPT_TEXT):
    return tokenizer.encode(text, add_special_tokens=False)


def pieces(tokenizer, ids):
    """The text each token adds when decoding them one after another."""
    out, prev = [], ""
    for i in range(1, len(ids) + 1):
        cur = tokenizer.decode(ids[:i])
        out.append(cur[len(prev) :])
        prev = cur
    return out


def run(model, tokenizer, prompt=PROMPT, **kw):
    responses = list(stream_generate(model, tokenizer, prompt, **kw))
    return "".join(r.text for r in responses), responses


# --- stop strings ----------------------------------------------------------------------------
def test_stop_string_ends_generation_without_leaking(mt):
    model, tok = mt
    ids = script_ids(tok)
    text, rs = run(model, tok, sampler=scripted(ids), max_tokens=len(ids), stop=["fine"])
    assert text == SCRIPT_TEXT[: SCRIPT_TEXT.index("fine")]
    assert rs[-1].finish_reason == "stop"
    assert all(r.finish_reason is None for r in rs[:-1])
    assert "fine" not in "".join(r.text for r in rs)


def test_stop_string_split_across_two_tokens(mt):
    model, tok = mt
    ids = script_ids(tok)
    parts = pieces(tok, ids)
    # A boundary with at least two characters on each side: the stop string spans two tokens.
    k = next(i for i in range(len(parts) - 1) if len(parts[i]) >= 2 and len(parts[i + 1]) >= 2)
    stop = parts[k][-2:] + parts[k + 1][:2]
    assert all(stop not in p for p in parts)
    full = "".join(parts)
    expected = full[: full.index(stop)]
    emitted = ""
    for r in stream_generate(model, tok, PROMPT, sampler=scripted(ids), max_tokens=len(ids), stop=[stop]):
        emitted += r.text
        # Never released, even before the second half arrives: the text so far is always final.
        assert expected.startswith(emitted)
    assert emitted == expected
    assert r.finish_reason == "stop"
    assert r.generation_tokens == k + 2


def test_held_back_text_is_released_when_no_stop_follows(mt):
    model, tok = mt
    ids = script_ids(tok)
    # "fine!" never appears, but "fine" is a prefix of it: that text is held and then released.
    text, rs = run(model, tok, sampler=scripted(ids), max_tokens=len(ids), stop=["fine!", "thank me"])
    assert text == SCRIPT_TEXT
    assert rs[-1].finish_reason == "length"


def test_stop_filter_unit_cases():
    class Detok:
        def __init__(self, pieces):
            self.pieces, self.text = pieces, ""

        def add_token(self, t):
            self.text += self.pieces[t]

        def finalize(self):
            pass

    def feed(pieces, stop):
        f = StopStringFilter(Detok(pieces), stop)
        out = [f.add(i) for i in range(len(pieces)) if not f.stopped]
        if not f.stopped:
            out.append(f.finish())
        return "".join(out), f.stopped

    assert feed(["ab", "c", "de"], ["cd"]) == ("ab", True)
    assert feed(["x", "<", "|", "end", "|>", "y"], ["<|end|>"]) == ("x", True)
    assert feed(["aaa", "b"], ["aab"]) == ("a", True)  # overlapping prefixes
    assert feed(["ab", "x"], ["abc", "bx"]) == ("a", True)  # the earliest stop wins
    assert feed(["ab", "x"], "zz") == ("abx", False)  # a single string is one stop
    assert feed(["ab", "x"], [""]) == ("abx", False)  # empty stops are ignored


# --- finish reasons --------------------------------------------------------------------------
def test_finish_reason_stop_on_eos(mt):
    model, tok = mt
    eos = next(iter(tok.eos_token_ids))
    text, rs = run(model, tok, logit_bias={eos: 1e4}, max_tokens=20)
    assert text == "" and rs[-1].finish_reason == "stop"
    assert rs[-1].generation_tokens == 1 and rs[-1].token == eos


def test_finish_reason_length(mt):
    model, tok = mt
    text, rs = run(model, tok, max_tokens=5, logit_bias={next(iter(tok.eos_token_ids)): -1e4})
    assert rs[-1].finish_reason == "length"
    assert rs[-1].generation_tokens == 5 and len(rs) == 5


def test_finish_reason_context(mt):
    model, tok = mt
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    no_eos = {next(iter(tok.eos_token_ids)): -1e4}
    _, rs = run(model, tok, prompt, max_tokens=None, max_context=len(prompt) + 4, logit_bias=no_eos)
    assert rs[-1].finish_reason == "context" and rs[-1].generation_tokens == 4
    # a max_tokens beyond the room left also ends with "context", at the window
    _, rs = run(model, tok, prompt, max_tokens=50, max_context=len(prompt) + 3, logit_bias=no_eos)
    assert rs[-1].finish_reason == "context" and rs[-1].generation_tokens == 3
    # max_tokens=-1 is mlx-lm's spelling of "no limit"
    _, rs = run(model, tok, prompt, max_tokens=-1, max_context=len(prompt) + 2, logit_bias=no_eos)
    assert rs[-1].finish_reason == "context"


def test_token_ids_outside_the_vocabulary_are_refused_before_any_work(mt):
    # MLX neither bounds-checks the scatter of logit_bias nor the embedding lookup: an id past the
    # vocabulary once corrupted the heap (a segfault a few runs later), so both are checked up front.
    from qwen2_mlx import batch_generate

    model, tok = mt
    vocab = model.args.vocab_size
    for bias in ({vocab: 1.0}, {-1: 1.0}, {"7": 1.0}, {True: 1.0}, {3: float("nan")}):
        with pytest.raises(ValueError, match="logit_bias"):
            run(model, tok, max_tokens=2, logit_bias=bias)
        with pytest.raises(ValueError, match="logit_bias"):
            batch_generate(model, tok, [PROMPT], max_tokens=2, logit_bias=bias)
    with pytest.raises(ValueError, match=f"token id {vocab} is outside"):
        run(model, tok, [1, 2, vocab])
    with pytest.raises(ValueError, match=r"prompts\[1\]: token id -3 is outside"):
        batch_generate(model, tok, [[1, 2], [-3]], max_tokens=2)
    text, rs = run(model, tok, max_tokens=3, logit_bias={vocab - 1: 0.5})  # the last id is a token
    assert rs[-1].generation_tokens <= 3


def test_prompt_longer_than_the_window_is_refused(mt):
    model, tok = mt
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    with pytest.raises(ContextOverflowError, match="does not fit"):
        run(model, tok, prompt, max_context=len(prompt))
    with pytest.raises(ValueError):
        run(model, tok, prompt, max_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        run(model, tok, [])


def test_finish_reason_cancelled_by_event_from_another_thread(mt):
    model, tok = mt
    cancel, started = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.wait(10), cancel.set()))
    worker.start()
    count = 0
    for r in stream_generate(  # noqa: B007 (read after the loop)
        model, tok, PROMPT, max_tokens=3000, cancel=cancel, logit_bias={next(iter(tok.eos_token_ids)): -1e4}
    ):
        count += 1
        started.set()
    worker.join()
    assert r.finish_reason == "cancelled"
    assert r.generation_tokens == count < 3000


def test_cancel_during_prefill(mt):
    model, tok = mt
    cancel = threading.Event()
    cancel.set()
    rs = list(stream_generate(model, tok, PROMPT * 4, cancel=cancel, prefill_step_size=8))
    assert len(rs) == 1 and rs[0].finish_reason == "cancelled" and rs[0].generation_tokens == 0


def test_closing_the_generator_stops_decoding(mt):
    from qwen2_mlx import make_prompt_cache

    model, tok = mt
    cache = make_prompt_cache(model)
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    gen = stream_generate(model, tok, prompt, max_tokens=100, prompt_cache=cache)
    seen = [next(gen) for _ in range(3)]
    gen.close()
    # The cache holds the prompt and the tokens seen, never more (no decoding after close).
    assert cache[0].offset <= len(prompt) + len(seen)
    with pytest.raises(StopIteration):
        next(gen)
    # the generation stream is free again
    assert generate(model, tok, PROMPT, max_tokens=2).finish_reason in ("length", "stop")


# --- sampling controls -----------------------------------------------------------------------
def test_logits_processors_see_the_whole_prompt_once(mt):
    model, tok = mt
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    seen = []

    def proc(tokens, logits):
        seen.append(tokens.tolist())
        return logits

    rs = list(stream_generate(model, tok, prompt, max_tokens=4, logits_processors=[proc], prefill_step_size=3))
    generated = [r.token for r in rs]
    assert seen[0] == prompt
    assert seen[1] == prompt + generated[:1]
    assert seen[3] == prompt + generated[:3]


def test_seed_makes_sampling_reproducible(mt):
    model, tok = mt
    a = generate(model, tok, PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, tok, PROMPT, max_tokens=12, temp=1.0, top_p=0.9, seed=7)
    c = generate(model, tok, PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=8)
    assert a == b
    assert a != c


def test_top_k_one_is_greedy_and_logit_bias_forces_a_token(mt):
    model, tok = mt
    greedy = generate(model, tok, PROMPT, max_tokens=8)
    assert generate(model, tok, PROMPT, max_tokens=8, temperature=2.0, top_k=1, seed=1) == greedy
    forced = tok.encode("fox", add_special_tokens=False)[0]
    rs = list(stream_generate(model, tok, PROMPT, max_tokens=3, logit_bias={forced: 1e4}))
    assert [r.token for r in rs] == [forced] * 3


def test_repetition_penalty_changes_greedy_output(mt):
    model, tok = mt
    plain = [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=30)]
    penalised = [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=30, repetition_penalty=5.0)]
    assert plain != penalised


def test_matches_mlx_lm_generate_step_greedy(mt):
    from mlx_lm.generate import generate_step as mlx_generate_step

    model, tok = mt
    prompt = mx.array(tok.encode(PROMPT, add_special_tokens=False))
    ours = [t for t, _ in generate_step(prompt, model, max_tokens=12, prefill_step_size=4)]
    theirs = [t for t, _ in mlx_generate_step(prompt, model, max_tokens=12, prefill_step_size=4)]
    assert ours == theirs


def test_progress_callback_and_stats(mt):
    model, tok = mt
    calls = []
    r = generate(
        model,
        tok,
        PROMPT * 3,
        max_tokens=3,
        prefill_step_size=8,
        prompt_progress_callback=lambda d, t: calls.append((d, t)),
    )
    total = len(tok.encode(PROMPT * 3, add_special_tokens=False))
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert isinstance(r, Reply) and isinstance(r, str)
    assert r.stats.prompt_tokens == total and r.stats.generation_tokens == 3
    assert r.stats.time_to_first_token > 0 and r.stats.generation_tps > 0


def test_reply_renders_markdown_with_the_reason(mt):
    model, tok = mt
    r = generate(model, tok, PROMPT, max_tokens=2)
    assert r.finish_reason == "length"
    assert r._repr_markdown_().startswith(str(r)) and "max_tokens" in r._repr_markdown_()
    assert Reply("**hi**", "stop")._repr_markdown_() == "**hi**"
