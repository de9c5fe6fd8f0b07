"""The real model: PyPI GGUF -> float32 MLX folder, checked against transformers' own GGUF reading."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.real_model

CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [
        {"role": "system", "content": "Tu es un assistant utile."},
        {"role": "user", "content": "Explique la récursivité en une phrase. 你好，世界！🙂"},
    ],
    [
        {"role": "user", "content": "こんにちは"},
        {"role": "assistant", "content": "こんにちは！何かお手伝いできますか？"},
        {"role": "user", "content": "Привет! <tool_call> def f(x):\n\treturn x**2\n</tool_call>"},
    ],
]


@pytest.fixture(scope="module")
def hf_reference(real_gguf_path):
    """transformers' model and tokenizer read from the same GGUF (its own dequantization)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(real_gguf_path.parent), real_gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def _hf_ids(tokenizer, conversation):
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_config_from_gguf_metadata(real_model_path, hf_reference):
    cfg = json.loads((real_model_path / "config.json").read_text())
    hf = hf_reference[0].config
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
    ):
        assert cfg[key] == getattr(hf, key), key
    assert cfg["model_type"] == "qwen2" and cfg["torch_dtype"] == "float32"
    assert cfg["rope_theta"] == pytest.approx(1e6) and cfg["rms_norm_eps"] == pytest.approx(1e-6)


def test_chat_template_ids_equal_transformers(real_model, hf_reference):
    _, ours = real_model
    theirs = hf_reference[1]
    for conv in CONVERSATIONS:
        assert ours.apply_chat_template(conv, add_generation_prompt=True) == _hf_ids(theirs, conv)
    text = "Hello wörld — 数学 ١٢٣ 🙂\n\n    indented\tcode  <|im_end|>"
    assert ours.encode(text) == theirs.encode(text)


def test_logits_and_greedy_tokens_match_transformers(real_model, hf_reference):
    import mlx.core as mx
    import torch

    model, tokenizer = real_model
    hf_model = hf_reference[0]
    ids = tokenizer.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(model(mx.array([ids]))[0])
    err = float(np.abs(ref - ours).max())
    print(f"max |logits - transformers| over {len(ids)} positions: {err:.2e}")
    assert err <= 1e-3

    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
    cache, x, got = model.make_cache(), mx.array([ids]), []
    for _ in range(24):
        token = int(mx.argmax(model(x, cache=cache)[0, -1]))
        got.append(token)
        x = mx.array([[token]])
    assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))
