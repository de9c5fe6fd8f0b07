"""batch_generate: the same results as one-by-one generation, per-row limits and stop strings."""

from __future__ import annotations

import pytest
from api_support import real_model_or_skip, tiny_model

from qwen2_mlx import batch_generate, stream_generate
from qwen2_mlx.bench.long_runs import twin
from qwen2_mlx.models.config import DCAConfig

PROMPTS = [
    "Hello, how",
    "The quick brown fox jumps over the lazy",
    "你好",
    "def main():\n    return",
    "Привет мир, how are you today? I am fine, thank you.",
    "🙂",
]


def one_by_one(model, tok, prompts, max_tokens, **kw):
    out = []
    for p, m in zip(prompts, max_tokens):
        rs = list(stream_generate(model, tok, p, m, **kw))
        out.append(([r.token for r in rs], "".join(r.text for r in rs), rs[-1].finish_reason))
    return out


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_batch_equals_one_by_one(tmp_path_factory, kind):
    model, tok, _ = tiny_model(tmp_path_factory, kind)
    limits = [24, 5, 24, 17, 9, 24]
    res = batch_generate(model, tok, PROMPTS, max_tokens=limits, batch_size=4)
    for (tokens, text, reason), got, ids in zip(one_by_one(model, tok, PROMPTS, limits), res.texts, res.token_ids):
        assert ids == tokens
        assert got == text and got.finish_reason == reason
    assert res.finish_reasons == [t.finish_reason for t in res.texts]
    assert res.stats.generation_tokens == sum(len(t) for t in res.token_ids)
    assert res.stats.prompt_tokens == sum(len(tok.encode(p, add_special_tokens=False)) for p in PROMPTS)


def test_stop_strings_eos_and_processors_per_row(tmp_path_factory):
    model, tok, _ = tiny_model(tmp_path_factory)
    kw = dict(stop=["!", "ab"], repetition_penalty=1.3, logit_bias={5: 2.0})
    res = batch_generate(model, tok, PROMPTS, max_tokens=20, batch_size=3, **kw)
    expected = one_by_one(model, tok, PROMPTS, [20] * len(PROMPTS), **kw)
    assert [(t, r) for _, t, r in expected] == [(str(t), t.finish_reason) for t in res.texts]
    assert "stop" in res.finish_reasons and all("!" not in t for t in res.texts)
    eos = next(iter(tok.eos_token_ids))
    forced = batch_generate(model, tok, PROMPTS[:3], max_tokens=8, logit_bias={eos: 1e4})
    assert forced.texts == ["", "", ""] and forced.finish_reasons == ["stop"] * 3
    assert forced.token_ids == [[eos]] * 3


def test_chat_message_prompts_and_token_prompts(tmp_path_factory):
    model, tok, _ = tiny_model(tmp_path_factory)
    messages = [{"role": "user", "content": "Hello"}]
    ids = tok.encode(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )
    res = batch_generate(model, tok, [messages, ids], max_tokens=6)
    assert res.token_ids[0] == res.token_ids[1]
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        batch_generate(model, tok, [[1.5, 2]], max_tokens=2)
    with pytest.raises(ValueError, match="entries"):
        batch_generate(model, tok, ["a", "b"], max_tokens=[1])
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        batch_generate(model, tok, [""], max_tokens=2)


def test_sampling_with_a_seed_is_reproducible(tmp_path_factory):
    model, tok, _ = tiny_model(tmp_path_factory)
    a = batch_generate(model, tok, PROMPTS, max_tokens=10, temperature=1.0, seed=3)
    b = batch_generate(model, tok, PROMPTS, max_tokens=10, temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_dca_rows_batch_within_the_window_and_run_alone_past_it(tmp_path_factory, kind):
    """A small DCA window (chunk 32): rows that stay within 33 tokens share the batch cache, the others
    cross the chunk edge alone on DCA caches; every row equals stream_generate's."""
    model, tok, _ = tiny_model(tmp_path_factory, kind)
    dca = twin(model, DCAConfig(chunk_size=32, local_size=8))
    limits = [4, 30, 6, 3, 40, 5]
    lengths = [len(tok.encode(p, add_special_tokens=False)) for p in PROMPTS]
    assert any(n + m > 33 for n, m in zip(lengths, limits)) and any(n + m <= 33 for n, m in zip(lengths, limits))
    res = batch_generate(dca, tok, PROMPTS, max_tokens=limits, batch_size=6)
    for (tokens, text, reason), got, ids in zip(one_by_one(dca, tok, PROMPTS, limits), res.texts, res.token_ids):
        assert ids == tokens
        assert got == text and got.finish_reason == reason


@pytest.mark.real_model
def test_real_model_batch_equals_one_by_one(request):
    model, tok = real_model_or_skip(request)
    prompts = [
        [{"role": "user", "content": q}]
        for q in ("What is 2+2?", "Name a colour.", "Write a Python function that adds two numbers.")
    ]
    res = batch_generate(model, tok, prompts, max_tokens=6)
    for p, ids in zip(prompts, res.token_ids):
        text = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        assert [r.token for r in stream_generate(model, tok, text, 6)] == ids


def test_benchmark_script_runs_and_compares(tmp_path_factory, tmp_path, capsys):
    from qwen2_mlx.bench.batch import main

    _, _, path = tiny_model(tmp_path_factory)
    assert main(["--model", str(path), "--prompts", "3", "--max-tokens", "3", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "identical token ids: 3/3 prompts" in out and "speed-up" in out
    assert main(["--model", str(tmp_path / "nothing")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--model", str(path), "--prompts", "0"])
    assert e.value.code == 2
