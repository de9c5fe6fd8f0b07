"""Qwen2 and Qwen2-MoE decoder models in MLX, following mlx-lm's model protocol.

Module attribute names equal the checkpoint's weight names, so a Hugging Face or mlx-lm
checkpoint loads through `sanitize` alone. `model(inputs, cache=None) -> logits`.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from .attention import Attention
from .config import ModelArgs
from .dca import effective_rope_scaling
from .kv_cache import DCAKVCache
from .mlp import MLP
from .moe import SparseMoeBlock
from .pipeline import pipeline_model
from .sharding import shard_model


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args)
        if args.is_sparse_layer(layer_idx):
            self.mlp = SparseMoeBlock(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Optional[Any] = None, cache: Optional[Any] = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.stage = None  # set by pipeline.pipeline_model: this rank's slice of the layers

    @property
    def own_layers(self) -> list:
        """The layers this process runs: all of them, or its pipeline stage's slice."""
        return self.layers if self.stage is None else self.layers[self.stage.start :]

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        layers = self.own_layers
        if cache is None:
            cache = [None] * len(layers)
        mask = create_attention_mask(h, cache[0])
        if self.stage is not None:
            h = self.stage.receive(h)
        for layer, c in zip(layers, cache):
            h = layer(h, mask, c)
        if self.stage is not None:
            h = self.stage.pass_on(h, cache)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        effective_rope_scaling(args)  # warns when rope_scaling is set but DCA overrides it
        self.model_type = args.model_type
        self.max_context = None  # the context limit when set (load(max_context=)); else the method's default
        self.model = Qwen2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        out = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    @property
    def layers(self):
        """The layers this process runs (a pipeline rank's slice); their caches are `make_cache()`'s."""
        return self.model.own_layers

    def shard(self, group: Optional[mx.distributed.Group] = None, parallel: str = "tensor") -> Model:
        """Split this model in place over `group`: "tensor" (sharding.py) or "pipeline" (pipeline.py)."""
        if parallel == "pipeline":
            return pipeline_model(self, group)
        if parallel != "tensor":
            raise ValueError(f'parallel must be "tensor" or "pipeline", not {parallel!r}')
        return shard_model(self, group)

    def pipeline(self, group: Optional[mx.distributed.Group] = None) -> Model:
        """Keep only this rank's contiguous slice of the layers (pipeline parallelism, pipeline.py)."""
        return pipeline_model(self, group)

    def stack_projections(self) -> None:
        """Stack q/k/v and gate/up now (after loading, quantizing or sharding), not at the next forward.

        Lazy like the weights: it joins the graph that next evaluates them.
        """
        for _, module in self.named_modules():
            if module is not self and hasattr(module, "stack_projections"):
                module.stack_projections()

    def make_cache(self):
        dca = self.args.dual_chunk_attention_config
        if dca is not None:
            return [
                DCAKVCache(dca.chunk_size, dca.local_size, dca.original_max_position_embeddings) for _ in self.layers
            ]
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict) -> dict:
        """Map checkpoint tensors onto our modules: drop rotary buffers and a tied head, stack experts."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        if not self.args.is_moe:
            return weights
        for i in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{i}.mlp"
            # transformers 5 in memory: fused (E, 2I, H) gate_up and (E, H, I) down tensors.
            fused = weights.pop(f"{prefix}.experts.gate_up_proj", None)
            if fused is not None:
                gate, up = mx.split(fused, 2, axis=1)
                weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate
                weights[f"{prefix}.switch_mlp.up_proj.weight"] = up
                weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(f"{prefix}.experts.down_proj")
                continue
            # Hub checkpoints: one tensor per expert (quantized ones carry scales and biases).
            for name in ("gate_proj", "up_proj", "down_proj"):
                for kind in ("weight", "scales", "biases"):
                    first = f"{prefix}.experts.0.{name}.{kind}"
                    if first in weights:
                        stacked = [
                            weights.pop(f"{prefix}.experts.{e}.{name}.{kind}") for e in range(self.args.num_experts)
                        ]
                        weights[f"{prefix}.switch_mlp.{name}.{kind}"] = mx.stack(stacked)
            # transformers 5 names the router `gate.weight` too; nothing to rename.
        return weights

    @property
    def quant_predicate(self):
        """Keep the router and shared-expert gate at 8 bits: routing is sensitive to quantization."""

        def predicate(path: str, module) -> Any:
            if path.endswith("mlp.gate") or path.endswith("mlp.shared_expert_gate"):
                return {"group_size": 64, "bits": 8}
            return True

        return predicate
