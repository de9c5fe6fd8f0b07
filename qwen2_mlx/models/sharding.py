"""Tensor-parallel Qwen2 and Qwen2-MoE on MLX's distributed engine (`mx.distributed`, `mlx.launch`).

Megatron-style sharding with mlx's own layers (`mlx.nn.layers.distributed`), as mlx-lm does it:
q/k/v and gate/up are split by output rows ("all-to-sharded"), o_proj and down_proj by input columns
("sharded-to-all", one `all_sum` each). MoE experts keep all E experts on every rank but each holds
1/N of every expert's intermediate dimension (`shard_inplace`); the shared expert is split the same
way and the block does a single `all_sum` of routed + shared output. The router and the
shared-expert gate are replicated, so every rank routes every token identically.

The command line that runs it is `python -m qwen2_mlx.distributed`.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from .mlp import MLP
from .moe import SparseMoeBlock


class ShardingError(ValueError):
    """A model that cannot be split over the given number of ranks; the message is one line."""


def _quant_group(module: nn.Module) -> Optional[int]:
    return getattr(module, "group_size", None) if hasattr(module, "scales") else None


def shard_problems(model: nn.Module, n: int) -> list[str]:
    """Why `model` cannot be split over `n` ranks (an empty list when it can)."""
    if n <= 1:
        return []
    args = model.args
    problems = []

    def need(name: str, count: int):
        if count % n:
            problems.append(f"{name} ({count}) does not divide by {n} ranks")

    need("num_attention_heads", args.num_attention_heads)
    need("num_key_value_heads", args.num_key_value_heads)
    layers = model.layers
    if any(isinstance(layer.mlp, MLP) for layer in layers):
        need("intermediate_size", args.intermediate_size)
    if any(isinstance(layer.mlp, SparseMoeBlock) for layer in layers):
        need("moe_intermediate_size", args.moe_intermediate_size)
        need("shared_expert_intermediate_size", args.shared_expert_intermediate_size)
    if problems:
        return problems

    # A quantized layer split by input columns must cut at quantization-group boundaries.
    seen = set()
    for layer in layers:
        cols = [("o_proj", layer.self_attn.o_proj)]
        if isinstance(layer.mlp, MLP):
            cols.append(("intermediate_size", layer.mlp.down_proj))
        else:
            cols.append(("moe_intermediate_size", layer.mlp.switch_mlp.down_proj))
            cols.append(("shared_expert_intermediate_size", layer.mlp.shared_expert.down_proj))
        for name, module in cols:
            gs = _quant_group(module)
            if gs is None:
                continue
            in_dims = module.weight.shape[-1] * 32 // module.bits
            if (in_dims // n) % gs and name not in seen:
                seen.add(name)
                problems.append(
                    f"{name} ({in_dims}) split over {n} ranks gives {in_dims // n} columns, "
                    f"not a multiple of the quantization group size {gs}"
                )
    return problems


def check_shardable(model: nn.Module, n: int) -> None:
    """Raise ShardingError (one line) when `model` cannot be split over `n` ranks."""
    problems = shard_problems(model, n)
    if problems:
        raise ShardingError(f"cannot shard {model.args.model_type} over {n} ranks: " + "; ".join(problems))


def shard_model(model: nn.Module, group: Optional[mx.distributed.Group] = None) -> nn.Module:
    """Split `model` in place over `group` (default: the global group) and return it."""
    group = group or mx.distributed.init()
    n = group.size()
    if n == 1:
        return model
    check_shardable(model, n)
    for layer in model.layers:
        attn = layer.self_attn
        attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
        attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
        attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads //= n
        attn.n_kv_heads //= n
        mlp = layer.mlp
        if isinstance(mlp, MLP):
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
        else:
            # In place: the block sums routed and shared partial outputs itself, in one all_sum.
            for expert in (mlp.switch_mlp, mlp.shared_expert):
                shard_inplace(expert.gate_proj, "all-to-sharded", group=group)
                shard_inplace(expert.up_proj, "all-to-sharded", group=group)
                shard_inplace(expert.down_proj, "sharded-to-all", group=group)
            mlp.sharding_group = group
    model.stack_projections()  # each rank stacks its own rows of q/k/v and gate/up
    return model
