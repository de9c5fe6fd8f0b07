"""Pipeline-parallel Qwen2 and Qwen2-MoE on MLX's distributed engine (`mx.distributed`, `mlx.launch`).

Each rank holds a contiguous slice of the decoder layers, rank 0 the first; the hidden state goes
rank to rank with `mx.distributed.send`/`recv_like`, as in mlx-lm's `PipelineMixin`. The embeddings,
final norm and head are replicated: every rank embeds (only the first rank's result is used; the
others need just its shape for `recv_like`) and every rank runs the head on the last rank's output,
which an `all_gather` hands to all, so the logits are the same everywhere and callers run unchanged.
A rank's KV cache holds only its own layers (`Model.layers` is the rank's slice).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .sharding import ShardingError


def layer_split(n_layers: int, n_ranks: int) -> list[tuple[int, int]]:
    """(start, end) of each rank's layers: contiguous, as even as possible, the first ranks one longer."""
    if n_ranks > n_layers:
        raise ShardingError(
            f"cannot pipeline {n_layers} layers over {n_ranks} ranks: every rank needs at least one layer"
        )
    base, extra = divmod(n_layers, n_ranks)
    bounds, start = [], 0
    for r in range(n_ranks):
        end = start + base + (r < extra)
        bounds.append((start, end))
        start = end
    return bounds


def _tie(cache_entry, x: mx.array) -> None:
    """Make the cache's keys depend on `x` (the send), so evaluating only the cache also sends.

    Chunked prefill evaluates only the caches (generation/generate.py `_prefill`); without this the
    send would never run and the next rank would wait on its receive forever.
    """
    keys = cache_entry.keys
    if isinstance(keys, (tuple, list)):  # a quantized cache: (data, scales, biases)
        cache_entry.keys = type(keys)(mx.depends(list(keys), [x]))
    else:
        cache_entry.keys = mx.depends(keys, x)


class Stage:
    """This rank's place in the pipeline: its first layer and the group the activations travel in."""

    def __init__(self, group: mx.distributed.Group, start: int, end: int):
        self.group, self.start, self.end = group, start, end
        self.rank, self.size = group.rank(), group.size()

    def receive(self, h: mx.array) -> mx.array:
        """The previous rank's output in place of `h` (the first rank keeps its embeddings)."""
        if self.rank == 0:
            return h
        return mx.distributed.recv_like(h, self.rank - 1, group=self.group)

    def pass_on(self, h: mx.array, cache: list) -> mx.array:
        """Send `h` to the next rank; return the last rank's output, on every rank."""
        if self.rank < self.size - 1:
            h = mx.distributed.send(h, self.rank + 1, group=self.group)
            if cache[-1] is not None:
                _tie(cache[-1], h)
        # all_gather stacks every rank's (B, L, D) along axis 0: the last B rows are the last rank's.
        return mx.distributed.all_gather(h, group=self.group)[-h.shape[0] :]


def pipeline_model(model: nn.Module, group: Optional[mx.distributed.Group] = None) -> nn.Module:
    """Keep only this rank's contiguous slice of `model`'s layers (in place) and return the model.

    The other layers' modules are dropped before their weights are evaluated, so a lazily loaded
    model never reads them. Layer numbers (and so weight names) stay those of the whole model.
    """
    group = group or mx.distributed.init()
    n = group.size()
    if n == 1:
        return model
    inner = model.model
    tensor_split = any(layer.self_attn.n_heads < model.args.num_attention_heads for layer in model.layers)
    if inner.stage is not None or tensor_split:
        raise ShardingError("the model is already split; pipeline a freshly loaded model")
    start, end = layer_split(len(inner.layers), n)[group.rank()]
    layers = inner.layers[:end]
    layers[:start] = [None] * start
    inner.layers = layers
    inner.stage = Stage(group, start, end)
    return model
