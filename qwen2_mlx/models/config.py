"""Model configuration: one dataclass for dense Qwen2 and Qwen2-MoE, read from `config.json`.

Field names are Hugging Face's, so a hub `config.json` maps onto it directly. Both the hub style
(`rope_theta`, `rope_scaling` with `type`/`rope_type`) and the transformers-5 style
(`rope_parameters`) are accepted and normalised here, once, so the model never has to care.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe")
ROPE_TYPES = ("default", "linear", "yarn")


class ConfigError(ValueError):
    """A config problem, always naming the file and the field."""

    def __init__(self, source: str, field_name: Optional[str], problem: str):
        self.source, self.field, self.problem = source, field_name, problem
        where = f"{source}: field '{field_name}'" if field_name else source
        super().__init__(f"{where}: {problem}")


@dataclass
class DCAConfig:
    """Dual Chunk Attention settings (Qwen2.5-1M's `dual_chunk_attention_config` keys)."""

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int = 0  # 0: no DCA temperature (docs/long-context.md §5)

    def to_dict(self) -> dict:
        return {
            "chunk_size": self.chunk_size,
            "local_size": self.local_size,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: Optional[int] = None
    rms_norm_eps: float = 1e-6
    head_dim: Optional[int] = None
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Qwen2-MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    # Long context
    dual_chunk_attention_config: Optional[DCAConfig] = None
    # mlx-lm's quantization block (written by mlx_lm.convert and our converter)
    quantization: Optional[dict] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen2_moe"

    def is_sparse_layer(self, i: int) -> bool:
        """HF's rule: a layer is MoE unless listed in mlp_only_layers or off the sparse step."""
        return (
            self.is_moe
            and self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type") or "default"

    @classmethod
    def from_dict(cls, params: dict, source: str = "config.json") -> ModelArgs:
        return _parse(params, source)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(str(path), None, "file not found")
        try:
            params = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(str(path), None, f"not valid JSON ({e})") from None
        if not isinstance(params, dict):
            raise ConfigError(str(path), None, "must hold a JSON object")
        return _parse(params, str(path))

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, DCAConfig):
                v = v.to_dict()
            if v is None:
                continue
            out[f.name] = v
        if not self.is_moe:
            for k in (
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "shared_expert_intermediate_size",
                "norm_topk_prob",
                "decoder_sparse_step",
                "mlp_only_layers",
            ):
                out.pop(k, None)
        return out


_REQUIRED = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_INT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "decoder_sparse_step",
)
_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta")
_BOOL_FIELDS = ("tie_word_embeddings", "norm_topk_prob", "rope_traditional")


def _check_type(source, name, value, kind):
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }[kind]
    if not ok:
        want = {"int": "an integer", "float": "a number", "bool": "true or false"}[kind]
        raise ConfigError(source, name, f"must be {want}, got {json.dumps(value)}")


def _parse(params: dict, source: str) -> ModelArgs:
    params = dict(params)
    if "model_type" not in params:
        raise ConfigError(source, "model_type", "is missing")
    mt = params["model_type"]
    # The architecture first: a llama config should say "unsupported", not "hidden_size is missing".
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            source,
            "model_type",
            f"unsupported architecture {json.dumps(mt)} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
        )
    for name in _REQUIRED:
        if name not in params:
            raise ConfigError(source, name, "is missing")
    if mt == "qwen2" and "intermediate_size" not in params:
        raise ConfigError(source, "intermediate_size", "is missing")
    if mt == "qwen2_moe":
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if name not in params:
                raise ConfigError(source, name, "is missing (required for qwen2_moe)")
        params.setdefault("intermediate_size", params.get("shared_expert_intermediate_size", 0))

    # transformers 5 stores rope_theta and the scaling dict together in rope_parameters.
    rp = params.pop("rope_parameters", None)
    if rp is not None:
        if not isinstance(rp, dict):
            raise ConfigError(source, "rope_parameters", "must be an object")
        if "rope_theta" in rp:
            params.setdefault("rope_theta", rp["rope_theta"])
        rtype = rp.get("rope_type") or rp.get("type") or "default"
        if rtype != "default" and not params.get("rope_scaling"):
            params["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}

    for name in _INT_FIELDS:
        if params.get(name) is not None:
            _check_type(source, name, params[name], "int")
    for name in _FLOAT_FIELDS:
        if params.get(name) is not None:
            _check_type(source, name, params[name], "float")
    for name in _BOOL_FIELDS:
        if params.get(name) is not None:
            _check_type(source, name, params[name], "bool")
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if params[name] <= 0:
            raise ConfigError(source, name, f"must be positive, got {params[name]}")

    act = params.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(source, "hidden_act", f"unsupported activation {json.dumps(act)} (Qwen2 uses silu)")

    heads, kv = params["num_attention_heads"], params.get("num_key_value_heads") or params["num_attention_heads"]
    if heads % kv:
        raise ConfigError(source, "num_key_value_heads", f"{kv} does not divide num_attention_heads ({heads})")
    if params.get("head_dim") is None and params["hidden_size"] % heads:
        raise ConfigError(
            source, "hidden_size", f"{params['hidden_size']} is not divisible by num_attention_heads ({heads})"
        )

    mlp_only = params.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
        raise ConfigError(source, "mlp_only_layers", "must be a list of layer indices")
    params["mlp_only_layers"] = mlp_only
    if params.get("decoder_sparse_step", 1) is not None and params.get("decoder_sparse_step", 1) <= 0:
        raise ConfigError(source, "decoder_sparse_step", "must be positive")

    params["rope_scaling"] = _parse_rope_scaling(params.get("rope_scaling"), source)
    params["dual_chunk_attention_config"] = parse_dca(params.get("dual_chunk_attention_config"), source)

    known = {f.name for f in fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in params.items() if k in known})


def _parse_rope_scaling(rs: Any, source: str) -> Optional[dict]:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(source, "rope_scaling", "must be an object or null")
    rtype = rs.get("rope_type") or rs.get("type") or "default"
    if rtype not in ROPE_TYPES:
        raise ConfigError(
            source,
            "rope_scaling.type",
            f"unsupported RoPE scaling {json.dumps(rtype)} (supported: {', '.join(ROPE_TYPES)})",
        )
    if rtype == "default":
        return None
    out = dict(rs)
    out["rope_type"] = rtype
    out.pop("type", None)
    factor = out.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise ConfigError(source, "rope_scaling.factor", f"must be a positive number, got {json.dumps(factor)}")
    for key in (
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "original_max_position_embeddings",
        "mscale",
        "mscale_all_dim",
    ):
        v = out.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ConfigError(source, f"rope_scaling.{key}", f"must be a number, got {json.dumps(v)}")
    if "truncate" in out and not isinstance(out["truncate"], bool):
        raise ConfigError(source, "rope_scaling.truncate", "must be true or false")
    return out


def parse_dca(dca: Any, source: str = "dca") -> Optional[DCAConfig]:
    """Validate DCA settings from config.json or from `load(..., dca={...})`."""
    if dca is None or isinstance(dca, DCAConfig):
        return dca
    if not isinstance(dca, dict):
        raise ConfigError(source, "dual_chunk_attention_config", "must be an object")
    vals = {}
    for key, default in (("chunk_size", 8192), ("local_size", 1024), ("original_max_position_embeddings", 0)):
        v = dca.get(key, default)  # vLLM's defaults for absent keys
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(
                source, f"dual_chunk_attention_config.{key}", f"must be a non-negative integer, got {json.dumps(v)}"
            )
        vals[key] = v
    if vals["chunk_size"] <= 0:
        raise ConfigError(source, "dual_chunk_attention_config.chunk_size", "must be positive")
    if not 0 < vals["local_size"] < vals["chunk_size"]:
        raise ConfigError(
            source,
            "dual_chunk_attention_config.local_size",
            f"must be between 1 and chunk_size-1 ({vals['chunk_size'] - 1}), got {vals['local_size']}",
        )
    return DCAConfig(**vals)
