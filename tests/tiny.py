"""Tiny random Qwen2 / Qwen2-MoE checkpoints written by transformers, for parity tests.

Weights are drawn at realistic scales (unit-variance activations, Qwen-like large q/k biases,
norm weights around 1) instead of transformers' 0.02-std init, which makes all logits nearly equal
and lets wrong code pass by accident.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DENSE = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    torch_dtype="float32",
)
MOE = dict(
    DENSE,
    model_type="qwen2_moe",
    architectures=["Qwen2MoeForCausalLM"],
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=48,
    shared_expert_intermediate_size=96,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)


def realistic_init(model, seed: int = 0) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p.shape[-1]
                std = 1.0 if "embed_tokens" in name else 1.0 / math.sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                # Qwen2's k/q biases are large; this is what makes RoPE bugs visible.
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(1.0 + 0.3 * torch.rand(p.shape, generator=g) - 0.15)


def make_checkpoint(path: Path, base: dict = DENSE, seed: int = 0, tokenizer: bool = True, **overrides):
    """Write a tiny checkpoint folder with transformers; return (path, torch model in float32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(base, **overrides)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    realistic_init(model, seed)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    # Rewrite config.json in the hub's style (rope_theta / rope_scaling at top level).
    hub_cfg = dict(cfg)
    (path / "config.json").write_text(json.dumps(hub_cfg, indent=2))
    if tokenizer:
        write_tokenizer(path, cfg["vocab_size"])
    return path, model


def write_tokenizer(path: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer with Qwen2's special tokens, trained on a little multilingual text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qwen2_mlx.bench.random_model import write_tokenizer_config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "你好，世界！今天天气很好。",
        "こんにちは世界",
        "Hello, how are you? I am fine, thank you.",
        "def main():\n    return 42\n",
        "Привет мир",
        "🙂 emoji 🎉",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path / "tokenizer.json"))
    write_tokenizer_config(path, QWEN_TEMPLATE, 4096)
