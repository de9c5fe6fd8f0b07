"""Dual Chunk Attention on the real model: a passkey ~2,500 tokens deep is still retrieved.

DCA is forced to chunk_size 1024 / local_size 256 (period 768), so the prompt spans four chunks and
every attention part (intra, successive with clamping, inter) takes part in the answer.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from qwen2_mlx import load
from qwen2_mlx.eval.prompts import first_number, passkey_prompt
from qwen2_mlx.generation.generate import generate

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def dca_real_model(real_model_path):
    return load(real_model_path, dca={"chunk_size": 1024, "local_size": 256}, dtype=mx.float32)


@pytest.mark.parametrize("depth,key", [(0.1, "58213"), (0.5, "40977"), (0.9, "72645")])
def test_passkey_with_dca(dca_real_model, depth, key):
    model, tokenizer = dca_real_model
    prompt = passkey_prompt(tokenizer, 2500, depth, key)
    assert 2300 < len(prompt.tokens) <= 2500 and prompt.needle_token > 0
    out = generate(model, tokenizer, prompt.tokens, max_tokens=6, prefill_step_size=1024)
    assert first_number(out) == key, out
