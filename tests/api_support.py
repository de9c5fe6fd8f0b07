"""Shared helpers for the Python API tests: one tiny model per session, scripted samplers."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tiny import DENSE, MOE, make_checkpoint

_MODELS: dict = {}


def tiny_model(tmp_path_factory, kind: str = "dense", **overrides):
    """(model, tokenizer, path) of a tiny random checkpoint, built once per session."""
    from qwen2_mlx import load

    key = (kind, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        path = tmp_path_factory.mktemp(f"tiny-{kind}")
        make_checkpoint(path, DENSE if kind == "dense" else MOE, **overrides)
        model, tokenizer = load(path)
        _MODELS[key] = (model, tokenizer, path)
    return _MODELS[key]


def scripted(tokens):
    """A sampler that emits `tokens` in order (then repeats the last one), whatever the logits."""
    it = iter(list(tokens))
    last = [tokens[-1]]

    def sampler(logprobs):
        last[0] = next(it, last[0])
        return mx.array([last[0]] * logprobs.shape[0], dtype=mx.uint32)

    return sampler


def real_model_or_skip(request):
    """The real model (tests/conftest.py's `real_model` fixture) or a skip while it is not there."""
    try:
        return request.getfixturevalue("real_model")
    except pytest.FixtureLookupError:
        pytest.skip("the real_model fixture (tests/conftest.py) is not available")
