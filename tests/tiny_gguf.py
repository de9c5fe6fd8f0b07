"""Tiny GGUF files written with the `gguf` package from a tiny transformers checkpoint (tests/tiny.py).

Tensor names, shapes and metadata follow llama.cpp's convert_hf_to_gguf.py for Qwen2 / Qwen2-MoE,
so these files exercise the same mapping a real llama.cpp file does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
}


def _gguf_tensors(hf_folder: Path, cfg: dict) -> dict[str, np.ndarray]:
    """llama.cpp-named float32 tensors from a tiny checkpoint's safetensors."""
    from safetensors.numpy import load_file

    w = {}
    for f in sorted(hf_folder.glob("*.safetensors")):
        w.update(load_file(str(f)))
    out = {"token_embd.weight": w["model.embed_tokens.weight"], "output_norm.weight": w["model.norm.weight"]}
    if "lm_head.weight" in w and not cfg.get("tie_word_embeddings"):
        out["output.weight"] = w["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for hf, gg in _LAYER.items():
            if p + hf in w:
                t = w[p + hf]
                if gg == "ffn_gate_inp_shexp.weight":
                    t = t.reshape(-1)  # llama.cpp stores the shared-expert gate as a vector
                out[f"blk.{i}.{gg}"] = t
        for proj, gg in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            first = f"{p}mlp.experts.0.{proj}.weight"
            if first in w:
                out[f"blk.{i}.{gg}.weight"] = np.stack(
                    [w[f"{p}mlp.experts.{e}.{proj}.weight"] for e in range(cfg["num_experts"])]
                )
            elif f"{p}mlp.experts.gate_up_proj" in w and proj != "down_proj":
                gate, up = np.split(w[f"{p}mlp.experts.gate_up_proj"], 2, axis=1)
                out[f"blk.{i}.{gg}.weight"] = gate if proj == "gate_proj" else up
            elif f"{p}mlp.experts.down_proj" in w and proj == "down_proj":
                out[f"blk.{i}.{gg}.weight"] = w[f"{p}mlp.experts.down_proj"]
    return {k: v.astype(np.float32) for k, v in out.items()}


def write_gguf(
    path: Path, hf_folder: Path, cfg: dict, qtypes=("Q8_0",), arch: str | None = None, chat_template: str | None = None
) -> Path:
    """Write `hf_folder` (tests/tiny.py checkpoint) as a GGUF; 2-D weights cycle through `qtypes`."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    arch = arch or ("qwen2moe" if cfg["model_type"] == "qwen2_moe" else "qwen2")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(
        cfg["intermediate_size"] if arch != "qwen2moe" else cfg["shared_expert_intermediate_size"]
    )
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(7)  # MOSTLY_Q8_0
    if arch == "qwen2moe":
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])

    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    added = {a["id"]: a for a in tok["added_tokens"]}
    tokens = [None] * cfg["vocab_size"]
    for t, i in vocab.items():
        tokens[i] = t
    for i, a in added.items():
        tokens[i] = a["content"]
    types = [3 if i in added and added[i]["special"] else 1 for i in range(len(tokens))]
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", 5
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    n = 0
    for name, t in _gguf_tensors(hf_folder, cfg).items():
        if t.ndim >= 2 and t.shape[-1] % 32 == 0:
            qt = getattr(Q, qtypes[n % len(qtypes)])
            n += 1
            if qt == Q.F32:
                w.add_tensor(name, t)
            elif qt == Q.F16:
                w.add_tensor(name, t.astype(np.float16))
            else:
                w.add_tensor(name, quantize(t, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
