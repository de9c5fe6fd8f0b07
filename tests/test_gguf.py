"""GGUF import on tiny files: names, config, tokenizer and logits against transformers' GGUF reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import DENSE, MOE, QWEN_TEMPLATE, make_checkpoint
from tiny_gguf import write_gguf


def _convert(gguf_path, out):
    from qwen2_mlx.convert.converter import convert
    from qwen2_mlx.convert.gguf import GGUFSource

    return convert(GGUFSource(gguf_path), out, dtype="float32")


def _hf_from_gguf(gguf_path, config_folder=None):
    """transformers' reading of the GGUF. Its qwen2moe metadata map ignores the expert sizes
    (expert_feed_forward_length), so for MoE files the config comes from the original checkpoint."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    extra = {"config": AutoConfig.from_pretrained(str(config_folder))} if config_folder else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, **extra
    ).eval()
    return model, AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_tensor_name_map():
    from qwen2_mlx.convert.gguf import hf_name

    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert hf_name("blk.0.ffn_down_exps.weight") == "model.layers.0.mlp.switch_mlp.down_proj.weight"
    assert hf_name("blk.1.ffn_gate_inp_shexp.weight") == "model.layers.1.mlp.shared_expert_gate.weight"
    assert hf_name("blk.1.rope_freqs.weight") is None


@pytest.mark.parametrize(
    "base,qtypes,tied",
    [
        (DENSE, ("Q8_0", "Q4_0", "Q5_1", "F16", "Q4_1", "Q5_0"), False),
        (DENSE, ("BF16", "Q8_0"), True),
        (MOE, ("Q8_0", "Q4_0", "F16"), False),
    ],
    ids=["dense-mixed-types", "dense-tied-bf16", "moe"],
)
def test_gguf_matches_transformers(tmp_path, base, qtypes, tied):
    import mlx.core as mx
    import torch

    import qwen2_mlx

    ckpt, _ = make_checkpoint(tmp_path / "hf", base, tie_word_embeddings=tied)
    cfg = dict(base, tie_word_embeddings=tied)
    (tmp_path / "gguf").mkdir()
    gguf_path = write_gguf(tmp_path / "gguf" / "tiny.gguf", ckpt, cfg, qtypes=qtypes, chat_template=QWEN_TEMPLATE)
    out = tmp_path / "mlx"
    _convert(gguf_path, out)

    written = json.loads((out / "config.json").read_text())
    assert written["tie_word_embeddings"] is tied
    assert written["model_type"] == base["model_type"]
    if base is MOE:
        assert written["num_experts"] == MOE["num_experts"]
        assert written["moe_intermediate_size"] == MOE["moe_intermediate_size"]
        assert written["shared_expert_intermediate_size"] == MOE["shared_expert_intermediate_size"]

    hf_model, hf_tok = _hf_from_gguf(gguf_path, ckpt if base is MOE else None)
    model, tok = qwen2_mlx.load(out)
    conv = [{"role": "user", "content": "The quick brown fox 你好 🙂"}]
    ids = tok.apply_chat_template(conv, add_generation_prompt=True)
    hf_ids = hf_tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    assert ids == list(hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids)
    text = "Hello, how are you? Привет мир <|im_end|> def main():\n    return 42"
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.decode(tok.encode(text)) == text

    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(model(mx.array([ids]))[0])
    assert np.abs(ref - ours).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def test_gguf_special_tokens_and_template(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "hf", DENSE)
    (tmp_path / "g").mkdir()
    gguf_path = write_gguf(tmp_path / "g" / "t.gguf", ckpt, DENSE, chat_template=QWEN_TEMPLATE)
    out = tmp_path / "mlx"
    _convert(gguf_path, out)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>" and tc["pad_token"] == "<|endoftext|>"
    assert tc["chat_template"] == QWEN_TEMPLATE
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert len(t.encode("<|im_start|>user").ids) >= 2 and t.encode("<|im_start|>").ids == [
        t.token_to_id("<|im_start|>")
    ]
