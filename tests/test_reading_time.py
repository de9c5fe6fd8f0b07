"""The reading-time estimate: its arithmetic, and its measurement on a real (tiny) model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen2_mlx.generation.reading_time import ReadingSpeed, attention_seconds_per_key, measure_reading_speed

costs = st.floats(0, 1e-2, allow_nan=False)
lengths = st.integers(0, 200_000)


@given(costs, costs, lengths, lengths, lengths)
def test_a_read_in_parts_costs_what_it_costs_whole(per_token, per_key, a, b, c):
    a, b, c = sorted((a, b, c))
    speed = ReadingSpeed(per_token, per_key)
    assert speed.seconds(a, b) + speed.seconds(b, c) == pytest.approx(speed.seconds(a, c), rel=1e-9, abs=1e-12)


def test_each_token_pays_for_the_keys_it_reads():
    keys_only = ReadingSpeed(0.0, 1.0)
    assert keys_only.seconds(0, 4) == 1 + 2 + 3 + 4  # token i reads the i keys up to itself
    assert keys_only.seconds(10, 11) == 11
    flat = ReadingSpeed(1 / 500)
    assert flat.tokens_per_s(0, 36_000) == pytest.approx(500)
    assert flat.tokens_per_s(30_000, 36_000) == pytest.approx(500)
    # With attention the average rate falls with the length: a flat rate promises too little.
    grows = ReadingSpeed(1 / 500, 1e-6)
    assert grows.tokens_per_s(0, 256) > 2 * grows.tokens_per_s(0, 36_000)
    assert grows.scaled(2.0, "x").seconds(0, 36_000) == pytest.approx(2 * grows.seconds(0, 36_000))


def test_attention_cost_per_key_is_measured_positive_for_a_real_attention_shape():
    # Qwen2-0.5B's attention (14 query and 2 KV heads of 64), one layer: more keys take measurably longer.
    args = SimpleNamespace(num_attention_heads=14, num_key_value_heads=2, head_dim=64, num_hidden_layers=1)
    import mlx.core as mx

    per_key = attention_seconds_per_key(SimpleNamespace(args=args), mx.float32)
    assert 0 < per_key < 1e-3 and math.isfinite(per_key)


def test_a_tiny_model_is_measured(mt):
    model, tokenizer = mt
    speed = measure_reading_speed(model, tokenizer, tokens=64)
    assert speed.seconds_per_token > 0 and speed.seconds_per_key >= 0
    assert speed.source == "a short calibration"
    assert speed.seconds(0, 1000) > speed.seconds(0, 100) > 0
