"""The fast single-token decode step: one `mx.compile`d graph per cache capacity.

A plain decode step rebuilds ~20 graph nodes per layer in Python for every token, which bounds
small models on fast devices. Here the whole step (embedding, all layers, head) is traced once and
replayed from C++, with its elementwise ops fused. The trace must not depend on the token position,
so (as in gpt-fast, and unlike a compiled decoder with a Python-int offset baked in, mlx-swift-lm
PR #550) it works on the KV cache's whole preallocated buffer: the position is an `mx.array` that
drives RoPE, the cache write (`mx.slice_update`) and a mask over the unused tail. The cache stays
mlx-lm's `KVCache`, so prompt caches, trimming and the plain path keep working on it unchanged.

Only exact `KVCache`s of a model without Dual Chunk Attention take this path (`fast_decoder` returns
None otherwise); quantized KV caches, DCA and anything else use the model's own forward.
"""

from __future__ import annotations

import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

DISABLE_ENV = "QWEN2_MLX_NO_FAST_DECODE"


class FastDecoder:
    """Compiled decode step for one model and its list of per-layer `KVCache`s."""

    step = KVCache.step  # grow the buffers like KVCache does, so memory use stays the same

    def __init__(self, model: nn.Module):
        self.model = model
        self._compiled = mx.compile(self._forward)

    def _forward(self, token: mx.array, pos: mx.array, keys: list, values: list):
        """token (1, 1), pos (1,) int32 -> logits (1, vocab) and the updated cache buffers."""
        inner = self.model.model
        h = inner.embed_tokens(token)
        cap = keys[0].shape[2]
        mask = (mx.arange(cap, dtype=mx.int32) <= pos)[None, None, None, :]
        new_keys, new_values = [], []
        for layer, kb, vb in zip(inner.layers, keys, values):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).reshape(1, 1, attn.n_heads, -1).transpose(0, 2, 1, 3)
            k = attn.k_proj(x).reshape(1, 1, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
            v = attn.v_proj(x).reshape(1, 1, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
            q = attn.rope(q, offset=pos[0])
            k = attn.rope(k, offset=pos[0])
            kb = mx.slice_update(kb, k.astype(kb.dtype), pos, axes=(2,))
            vb = mx.slice_update(vb, v.astype(vb.dtype), pos, axes=(2,))
            new_keys.append(kb)
            new_values.append(vb)
            o = mx.fast.scaled_dot_product_attention(q, kb, vb, scale=attn.scale, mask=mask)
            h = h + attn.o_proj(o.transpose(0, 2, 1, 3).reshape(1, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        out = inner.norm(h)
        if self.model.args.tie_word_embeddings:
            logits = inner.embed_tokens.as_linear(out)
        else:
            logits = self.model.lm_head(out)
        return logits[:, -1, :], new_keys, new_values

    def __call__(self, token: mx.array, cache: list) -> mx.array:
        """Logits (1, vocab) for one token; writes its keys and values into `cache`."""
        pos = cache[0].offset
        if pos + 1 > cache[0].keys.shape[2]:
            for c in cache:
                if pos < c.keys.shape[2]:  # trimmed earlier: drop the stale tail first, as KVCache does
                    c.keys, c.values = c.keys[..., :pos, :], c.values[..., :pos, :]
                B, H, _, D = c.keys.shape
                c.keys = mx.concatenate([c.keys, mx.zeros((B, H, self.step, D), c.keys.dtype)], axis=2)
                c.values = mx.concatenate(
                    [c.values, mx.zeros((B, H, self.step, c.values.shape[3]), c.values.dtype)], axis=2)
        logits, keys, values = self._compiled(token.reshape(1, 1), mx.array([pos], dtype=mx.int32),
                                              [c.keys for c in cache], [c.values for c in cache])
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values = k, v
            c.offset += 1
        return logits


def fast_decode_applies(model: nn.Module, cache: list) -> bool:
    """True when the compiled step computes exactly what `model(token, cache)` would."""
    from .model import Model

    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return False
    if not isinstance(model, Model) or getattr(model.args, "dual_chunk_attention_config", None) is not None:
        return False
    if len(cache) != len(model.layers) or any(type(c) is not KVCache for c in cache):
        return False
    if not all(_unsharded(layer) for layer in model.layers):
        return False  # tensor-parallel layers (distributed.py) keep the model's own forward
    first = cache[0]
    return first.keys is not None and first.keys.shape[0] == 1 and all(c.offset == first.offset for c in cache)


def _unsharded(layer: nn.Module) -> bool:
    attn = layer.self_attn
    plain = (nn.Linear, nn.QuantizedLinear)
    return (type(attn.q_proj) in plain and type(attn.o_proj) in plain
            and getattr(layer.mlp, "sharding_group", None) is None
            and all(type(m) in plain for m in (getattr(layer.mlp, "down_proj", None),) if m is not None))


def fast_decoder(model: nn.Module) -> FastDecoder:
    """The model's compiled decoder, made once per model (traces are cached per cache capacity)."""
    dec = getattr(model, "_qwen2_mlx_fast_decoder", None)
    if dec is None:
        dec = FastDecoder(model)
        object.__setattr__(model, "_qwen2_mlx_fast_decoder", dec)
    return dec


def decode_step(model: nn.Module, token: mx.array, cache: list) -> Optional[mx.array]:
    """Logits (1, vocab) of one token through the compiled step, or None when it does not apply."""
    if token.size != 1 or not fast_decode_applies(model, cache):
        return None
    return fast_decoder(model)(token, cache)
