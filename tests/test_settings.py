"""GenerationSettings: one object for every generation setting, checked in one place, taken everywhere.

The keyword settings (mlx-lm's names) and `settings=` must give the same tokens, exactly; bad values
fail with the field's name before any work.
"""

from __future__ import annotations

import dataclasses

import pytest

from qwen2_mlx import Chat, GenerationSettings, batch_generate, generate, stream_generate
from qwen2_mlx.generation.settings import CHAT_KEYS, SAMPLING_KEYS, turn_settings

PROMPT = "The quick brown fox jumps over the lazy dog. The quick"


@pytest.mark.parametrize(
    "field,value,error",
    [
        ("temperature", -0.1, ValueError),
        ("temperature", "hot", TypeError),
        ("top_p", 1.5, ValueError),
        ("top_k", 2.5, TypeError),
        ("min_p", -1, ValueError),
        ("repetition_context_size", 0, ValueError),
        ("seed", -3, ValueError),
        ("max_tokens", 0, ValueError),
        ("max_context", 0, ValueError),
        ("prefill_step_size", 0, ValueError),
        ("num_draft_tokens", 0, ValueError),
        ("kv_bits", 7, ValueError),
        ("logit_bias", [1, 2], TypeError),
        ("stop", [1], TypeError),
        ("lookup", "yes", TypeError),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(field, value, error):
    with pytest.raises(error, match=field if field != "lookup" else "lookup must be"):
        GenerationSettings(**{field: value})


def test_values_are_normalised_once():
    s = GenerationSettings(max_tokens=-1, stop="END")
    assert s.max_tokens is None and s.stop == ("END",)  # mlx-lm's "no limit"; one stop string
    assert GenerationSettings(stop=None).stop == ()
    assert GenerationSettings(lookup=True).lookup_settings.ngram_max == 4
    assert GenerationSettings(lookup=False).lookup_settings is None and not GenerationSettings().speculative


def test_build_takes_mlx_lm_names_and_refuses_unknown_ones():
    assert GenerationSettings.build(temp=0.5).temperature == 0.5
    base = GenerationSettings(top_p=0.9, max_tokens=7)
    s = GenerationSettings.build(base, temperature=0.3)
    assert (s.top_p, s.max_tokens, s.temperature) == (0.9, 7, 0.3) and base.temperature == 0.0
    with pytest.raises(TypeError, match="unknown generation setting 'warmth'"):
        GenerationSettings.build(warmth=1)
    with pytest.raises(TypeError, match="must be a GenerationSettings"):
        GenerationSettings.build({"temperature": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.temperature = 1.0


def test_json_schema_and_speculative_decoding_do_not_mix():
    with pytest.raises(ValueError, match="json_schema cannot be combined with speculative decoding"):
        GenerationSettings(json_schema=True, lookup=True)


def test_every_setting_has_one_home():
    names = set(GenerationSettings.names())
    assert set(SAMPLING_KEYS) <= names and set(CHAT_KEYS) <= names
    record = {"temperature": 0.7, "seed": None, "max_tokens": None, "kv_bits": 8, "context_policy": "refuse"}
    assert turn_settings(record) == {"temperature": 0.7, "max_tokens": None}  # the chat's and the app's keys stay out


def test_settings_and_keywords_give_the_same_tokens(mt):
    model, tok = mt
    no_eos = {e: -1e4 for e in tok.eos_token_ids}
    kw = dict(temperature=0.8, top_p=0.9, top_k=20, seed=3, max_tokens=12, repetition_penalty=1.1, logit_bias=no_eos)
    by_keywords = [r.token for r in stream_generate(model, tok, PROMPT, **kw)]
    by_object = [r.token for r in stream_generate(model, tok, PROMPT, settings=GenerationSettings(**kw))]
    assert by_keywords == by_object and len(by_object) == 12
    # a keyword on top of settings= wins; max_tokens positionally too
    assert generate(model, tok, PROMPT, 3, settings=GenerationSettings(**kw)).stats.generation_tokens == 3
    assert len(list(stream_generate(model, tok, PROMPT, settings=GenerationSettings(**kw), max_tokens=5))) == 5


def test_stream_generate_refuses_a_bad_setting_before_any_work(mt):
    model, tok = mt
    with pytest.raises(TypeError, match="unknown generation setting 'tempreature'"):
        next(stream_generate(model, tok, PROMPT, tempreature=0.5))
    with pytest.raises(ValueError, match="top_p"):
        next(stream_generate(model, tok, PROMPT, settings=GenerationSettings(), top_p=2))


def test_batch_generate_takes_the_same_object(mt):
    model, tok = mt
    s = GenerationSettings(max_tokens=6, logit_bias={e: -1e4 for e in tok.eos_token_ids})
    batched = batch_generate(model, tok, [PROMPT, "Hello"], settings=s)
    alone = [[r.token for r in stream_generate(model, tok, p, settings=s)] for p in (PROMPT, "Hello")]
    assert batched.token_ids == alone
    with pytest.raises(ValueError, match="batch_generate does not take lookup"):
        batch_generate(model, tok, [PROMPT], settings=GenerationSettings(lookup=True))


def test_a_chat_takes_settings_and_keeps_its_own(mt):
    model, tok = mt
    s = GenerationSettings(temperature=0.0, max_tokens=4)
    by_object, by_keywords = Chat(model, tok, settings=s), Chat(model, tok, temperature=0.0, max_tokens=4)
    assert by_object.sampling == {"max_tokens": 4}  # what differs from a chat's defaults
    assert by_object.send("Hi") == by_keywords.send("Hi")
    assert by_object.settings.max_tokens == 4 and Chat(model, tok).settings.max_tokens is None  # a chat runs to the end
    turn = by_object.settings.replace(max_tokens=2)
    assert by_object.send("Again", settings=turn).stats.generation_tokens <= 2
    with pytest.raises(ValueError, match="kv_bits is a setting of the chat"):
        by_object.send("Hi", settings=turn.replace(kv_bits=8))
    with pytest.raises(TypeError, match="draft_model is a setting of the chat"):
        by_object.send("Hi", draft_model=model)
