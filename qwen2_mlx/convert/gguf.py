"""Read a llama.cpp GGUF file as a Qwen2 / Qwen2-MoE checkpoint.

`GGUFSource` exposes what the writer needs: a Hugging Face style `config.json` dict built from the
`qwen2.*` / `qwen2moe.*` metadata, the tensors under our (mlx-lm) names, dequantized to float one
at a time by `gguf.quants.dequantize`, and the tokenizer files rebuilt with `tokenizers` from the
GGUF vocabulary, merges and token types.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from .errors import ConvertError

# llama.cpp architecture name -> (HF model_type, HF architectures entry)
ARCHITECTURES = {
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
}

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2 / Qwen2.5 repo; llama.cpp's "qwen2" pre).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp pre-tokenizer names that use Qwen2's split.
QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "megrez", "default", ""}

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # Qwen2-MoE: router, stacked experts (E, out, in), shared expert and its gate
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.switch_mlp.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.switch_mlp.up_proj.weight",
    "ffn_down_exps.weight": "mlp.switch_mlp.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")

# general.file_type -> the dtype the unquantized model had (quantized files: float16, llama.cpp's compute type)
_FILE_TYPE_DTYPE = {0: "float32", 1: "float16", 32: "bfloat16"}


def hf_name(gguf_name: str) -> Optional[str]:
    """Our tensor name for a llama.cpp tensor name, or None when it is not part of a Qwen2 model."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def open_reader(path: Path):
    """A GGUFReader for `path`, turning every way a file can be damaged into a ConvertError."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file")
    if not path.is_file():
        raise ConvertError(f"{path}: is not a file (--gguf expects a .gguf file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConvertError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged files
        raise ConvertError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ConvertError(f"{path}: truncated GGUF file (tensor {t.name} runs past the end of the file)")
    return reader


class GGUFSource:
    """A GGUF file seen as a Qwen2 checkpoint (config, tensors under mlx-lm names, tokenizer)."""

    kind = "gguf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = open_reader(self.path)
        arch = _field(self.reader, "general.architecture")
        if arch not in ARCHITECTURES:
            raise ConvertError(
                f"{self.path}: unsupported architecture {json.dumps(arch)} in general.architecture "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self.arch = arch
        self._tensors = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:
                raise ConvertError(f"{self.path}: unexpected tensor {t.name!r} for a {arch} model")
            self._tensors[name] = t
        if "model.embed_tokens.weight" not in self._tensors:
            raise ConvertError(f"{self.path}: tensor 'token_embd.weight' is missing")
        self.config = self._build_config()
        self.quantization = None  # dequantized to float: nothing to carry over

    # --- config ------------------------------------------------------------------------------
    def _meta(self, key: str, required: bool = True, default: Any = None) -> Any:
        value = _field(self.reader, f"{self.arch}.{key}")
        if value is None and required:
            raise ConvertError(f"{self.path}: metadata field '{self.arch}.{key}' is missing")
        return default if value is None else value

    def _build_config(self) -> dict:
        model_type, hf_arch = ARCHITECTURES[self.arch]
        vocab_size, hidden = self.shape("model.embed_tokens.weight")
        heads = self._meta("attention.head_count")
        cfg: dict = {
            "architectures": [hf_arch],
            "model_type": model_type,
            "hidden_size": self._meta("embedding_length"),
            "num_hidden_layers": self._meta("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._meta("attention.head_count_kv", False, heads),
            "max_position_embeddings": self._meta("context_length", False, 32768),
            "rope_theta": _f32(self._meta("rope.freq_base", False, 10000.0)),
            "rms_norm_eps": _f32(self._meta("attention.layer_norm_rms_epsilon", False, 1e-6)),
            "vocab_size": vocab_size,
            "hidden_act": "silu",
            # llama.cpp drops output.weight when the head shares the embedding.
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "torch_dtype": _FILE_TYPE_DTYPE.get(_field(self.reader, "general.file_type"), "float16"),
            "use_sliding_window": False,
        }
        if hidden != cfg["hidden_size"]:
            raise ConvertError(
                f"{self.path}: token_embd.weight has width {hidden}, "
                f"{self.arch}.embedding_length says {cfg['hidden_size']}"
            )
        key_len = self._meta("attention.key_length", False)
        if key_len and key_len != cfg["hidden_size"] // heads:
            cfg["head_dim"] = key_len
        rope_type = self._meta("rope.scaling.type", False)
        if rope_type in ("yarn", "linear"):
            cfg["rope_scaling"] = {
                "type": rope_type,
                "rope_type": rope_type,
                "factor": float(self._meta("rope.scaling.factor")),
            }
            orig = self._meta("rope.scaling.original_context_length", False)
            if orig:
                cfg["rope_scaling"]["original_max_position_embeddings"] = orig
        elif rope_type not in (None, "none"):
            raise ConvertError(f"{self.path}: unsupported RoPE scaling {rope_type!r} in {self.arch}.rope.scaling.type")

        layers = cfg["num_hidden_layers"]
        if self.arch == "qwen2":
            cfg["intermediate_size"] = self._meta("feed_forward_length")
        else:
            cfg["num_experts"] = self._meta("expert_count")
            cfg["num_experts_per_tok"] = self._meta("expert_used_count")
            moe_ff = self._meta("expert_feed_forward_length", False)
            shared_ff = self._meta("expert_shared_feed_forward_length", False)
            sparse = [i for i in range(layers) if f"model.layers.{i}.mlp.gate.weight" in self._tensors]
            if not sparse:
                raise ConvertError(f"{self.path}: a qwen2moe file without any ffn_gate_inp (router) tensor")
            first = f"model.layers.{sparse[0]}.mlp"
            if moe_ff is None:
                moe_ff = self.shape(f"{first}.switch_mlp.gate_proj.weight")[1]
            if shared_ff is None:
                key = f"{first}.shared_expert.gate_proj.weight"
                shared_ff = self.shape(key)[0] if key in self._tensors else 0
            cfg["moe_intermediate_size"] = moe_ff
            cfg["shared_expert_intermediate_size"] = shared_ff
            cfg["intermediate_size"] = self._meta("feed_forward_length", False, shared_ff)
            cfg["norm_topk_prob"] = bool(self._meta("expert_weights_norm", False, False))
            cfg["decoder_sparse_step"] = 1
            cfg["mlp_only_layers"] = [i for i in range(layers) if i not in sparse]
        for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            value = _field(self.reader, f"tokenizer.ggml.{key}")
            if value is not None:
                cfg[name] = int(value)
        return cfg

    # --- tensors ------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple:
        """The tensor's shape in numpy / Hugging Face order (GGUF stores dimensions reversed)."""
        shape = tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))
        if name.endswith("mlp.shared_expert_gate.weight") and len(shape) == 1:
            return (1, shape[0])  # llama.cpp stores the shared-expert gate as a vector
        return shape

    def dtype(self, name: str) -> mx.Dtype:
        return mx.float32

    def tensor(self, name: str) -> mx.array:
        """Dequantize one tensor to float32."""
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            data = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ConvertError(
                f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package cannot dequantize"
            ) from None
        return mx.array(np.ascontiguousarray(data, dtype=np.float32).reshape(self.shape(name)))

    def tensors(self) -> Iterator[tuple[str, mx.array]]:
        for name in self._tensors:
            yield name, self.tensor(name)

    def release(self, name: str) -> None:
        """Nothing to drop: tensors are memory-mapped and dequantized on demand."""

    # --- tokenizer ----------------------------------------------------------------------------
    def write_tokenizer(self, dest: Path) -> None:
        tokenizer, tok_config = build_tokenizer(self.reader, self.path)
        tokenizer.save(str(Path(dest) / "tokenizer.json"))
        (Path(dest) / "tokenizer_config.json").write_text(
            json.dumps(tok_config, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        eos = self.config.get("eos_token_id")
        if eos is not None:
            gen = {"bos_token_id": self.config.get("bos_token_id"), "eos_token_id": eos}
            (Path(dest) / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")


def build_tokenizer(reader, path: Path):
    """A byte-level BPE `tokenizers.Tokenizer` and a tokenizer_config dict from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ConvertError(f"{path}: tokenizer.ggml.model is {model!r}; Qwen2 uses byte-level BPE ('gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", "")
    if pre not in QWEN2_PRE:
        raise ConvertError(f"{path}: unsupported pre-tokenizer {pre!r} in tokenizer.ggml.pre (Qwen2 uses 'qwen2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens or not merges:
        raise ConvertError(f"{path}: metadata field 'tokenizer.ggml.tokens' or 'tokenizer.ggml.merges' is missing")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)

    # Tokens are stored in the byte-level alphabet; one that is not (a llama.cpp quirk for some added
    # tokens) is respelled through it, as transformers does, so its id keeps its place.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        spelled = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(spelled, i)
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ", 1)) for m in merges],
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()

    # Token type 3 (control) is a special token, 4 (user-defined, e.g. <tool_call>) an added plain token.
    added: list[tuple[int, AddedToken]] = []
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind == 3 and set(t) <= alphabet:
            added.append((i, AddedToken(t, special=True, normalized=False)))
        elif kind == 4:
            added.append((i, AddedToken(t, special=False, normalized=False)))
    tok.add_special_tokens([a for _, a in added if a.special])
    tok.add_tokens([a for _, a in added if not a.special])

    def token_at(key: str) -> Optional[str]:
        i = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, pad = token_at("bos_token_id"), token_at("eos_token_id"), token_at("padding_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    if add_bos and bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, int(_field(reader, "tokenizer.ggml.bos_token_id")))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    return tok, _tokenizer_config(reader, added, add_bos, bos, eos, pad)


def _tokenizer_config(reader, added: list, add_bos: bool, bos, eos, pad) -> dict:
    """tokenizer_config.json as transformers writes it for Qwen2, from the GGUF metadata."""
    config = {
        "add_bos_token": add_bos,
        "add_prefix_space": False,
        "bos_token": bos if add_bos else None,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length", 32768)),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(i): {
                "content": a.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": a.special,
            }
            for i, a in added
        },
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))
