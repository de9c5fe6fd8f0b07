"""Model folders with random weights of real Qwen2 shapes, for benchmarks on machines without a model.

Shapes come from the Hugging Face configs of the released checkpoints. The folder holds config.json,
sharded `model-*.safetensors` (experts already stacked the way mlx-lm stores them) and a byte-level
tokenizer, so both `qwen2_mlx.load` and `mlx_lm.load` open it offline.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Union

import mlx.core as mx

from .presets import PRESETS  # noqa: F401  (re-exported; the shapes live apart so `--help` needs no MLX)

SHARD_BYTES = 2 << 30
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


def tensor_shapes(cfg: dict) -> dict[str, tuple]:
    """Name -> shape of every tensor of a checkpoint with this config (MoE experts stacked)."""
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nh
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    for i in range(L):
        p = f"model.layers.{i}"
        shapes.update(
            {
                f"{p}.input_layernorm.weight": (h,),
                f"{p}.post_attention_layernorm.weight": (h,),
                f"{p}.self_attn.q_proj.weight": (nh * d, h),
                f"{p}.self_attn.q_proj.bias": (nh * d,),
                f"{p}.self_attn.k_proj.weight": (nkv * d, h),
                f"{p}.self_attn.k_proj.bias": (nkv * d,),
                f"{p}.self_attn.v_proj.weight": (nkv * d, h),
                f"{p}.self_attn.v_proj.bias": (nkv * d,),
                f"{p}.self_attn.o_proj.weight": (h, nh * d),
            }
        )
        if cfg["model_type"] == "qwen2_moe":
            E, mi, si = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
            shapes.update(
                {
                    f"{p}.mlp.gate.weight": (E, h),
                    f"{p}.mlp.shared_expert_gate.weight": (1, h),
                    f"{p}.mlp.switch_mlp.gate_proj.weight": (E, mi, h),
                    f"{p}.mlp.switch_mlp.up_proj.weight": (E, mi, h),
                    f"{p}.mlp.switch_mlp.down_proj.weight": (E, h, mi),
                    f"{p}.mlp.shared_expert.gate_proj.weight": (si, h),
                    f"{p}.mlp.shared_expert.up_proj.weight": (si, h),
                    f"{p}.mlp.shared_expert.down_proj.weight": (h, si),
                }
            )
        else:
            mi = cfg["intermediate_size"]
            shapes.update(
                {
                    f"{p}.mlp.gate_proj.weight": (mi, h),
                    f"{p}.mlp.up_proj.weight": (mi, h),
                    f"{p}.mlp.down_proj.weight": (h, mi),
                }
            )
    return shapes


def _random_tensor(name: str, shape: tuple, dtype: mx.Dtype) -> mx.array:
    # Realistic scales: unit-variance activations, Qwen-like large q/k biases, norms near 1.
    if name.endswith("norm.weight"):
        return (1.0 + 0.3 * mx.random.uniform(shape=shape) - 0.15).astype(dtype)
    if name.endswith("bias"):
        return (0.5 * mx.random.normal(shape)).astype(dtype)
    std = 1.0 if "embed_tokens" in name else 1.0 / math.sqrt(shape[-1])
    return (std * mx.random.normal(shape)).astype(dtype)


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer (256 byte tokens, no merges) with Qwen2's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    write_tokenizer_config(path, _TEMPLATE, 32768, tokenizer_class="Qwen2Tokenizer")


def write_tokenizer_config(path: Path, chat_template: str, model_max_length: int, **extra) -> None:
    """tokenizer_config.json with Qwen2's special tokens (im_end ends a turn, no BOS) and `chat_template`."""
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    config.update(chat_template=chat_template, model_max_length=model_max_length, **extra)
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_random_model(preset: str, path: Union[str, Path], dtype: mx.Dtype = mx.bfloat16, seed: int = 0) -> Path:
    """Write a random-weight model folder of `preset`'s shape to `path`; reuse it when complete."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    path = Path(path)
    cfg = dict(PRESETS[preset], torch_dtype={mx.float32: "float32", mx.float16: "float16"}.get(dtype, "bfloat16"))
    if (path / "config.json").exists() and json.loads((path / "config.json").read_text()) == cfg:
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.random.seed(seed)
    n, current, size = 0, {}, 0
    for name, shape in tensor_shapes(cfg).items():
        t = _random_tensor(name, shape, dtype)
        mx.eval(t)
        current[name] = t
        size += t.nbytes
        if size >= SHARD_BYTES:
            n += 1
            mx.save_safetensors(str(tmp / f"shard-{n}.safetensors"), current, metadata={"format": "mlx"})
            current, size = {}, 0
    if current:
        n += 1
        mx.save_safetensors(str(tmp / f"shard-{n}.safetensors"), current, metadata={"format": "mlx"})
    for i in range(1, n + 1):
        (tmp / f"shard-{i}.safetensors").rename(tmp / f"model-{i:05d}-of-{n:05d}.safetensors")
    write_tokenizer(tmp)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
