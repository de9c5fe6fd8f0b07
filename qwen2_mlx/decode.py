"""The fast single-token decode step: fewer kernels per token, same arithmetic as the model.

At batch 1 a small model's decode step is bound by the number of kernels it runs, not by bandwidth
(mlx-lm reaches about 8 % of the H100's bandwidth roofline on Qwen2-0.5B). This step builds about 30 %
fewer graph nodes per token than the plain forward:
- q, k and v come from one matmul over the rows of the three weights stacked, and the MLP's gate and
  up projections from one matmul likewise. Each output row is still the same dot product, so the
  results are the same (bitwise on a CPU; CUDA may pick another matmul kernel for the stacked shape,
  float32 logits then differ by ~1e-3); the module weights become views into the stacked arrays (no extra memory),
  so the plain forward, prefill and saving keep working on them;
- one RoPE call rotates q and k together (they sit side by side in the fused output).
The KV cache is mlx-lm's `KVCache`, written and read exactly as the plain forward does (exact-length
views, no mask), so prompt caches, trimming and the plain path all keep working on it.

A compiled (`mx.compile`) step over a fixed-capacity cache with an array-valued position was measured
first and dropped: it was slower than mlx-lm (H100: 0.96x on 0.5B, 0.79x on 7B). The likely cause is the
mask over the unused cache tail, which keeps attention off the fused single-query SDPA kernel.

Only exact `KVCache`s of an unsharded model without Dual Chunk Attention take this path
(`decode_step` returns None otherwise); quantized KV caches, DCA and batches use the model's forward.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

DISABLE_ENV = "QWEN2_MLX_NO_FAST_DECODE"
_LINEAR = (nn.Linear, nn.QuantizedLinear)
_QUANT_ATTRS = ("group_size", "bits", "mode")


def stack_linears(mods: list) -> Optional[nn.Module]:
    """One linear layer computing `mods` side by side; the inputs' tensors become views into it.

    Returns None when the layers can't be stacked (different types, quantization or tensors).
    """
    first = mods[0]
    keys = [k for k in ("weight", "scales", "biases", "bias") if k in first]
    if type(first) not in _LINEAR or any(type(m) is not type(first) or sorted(m) != sorted(first) for m in mods):
        return None
    if any(getattr(m, a, None) != getattr(first, a, None) for m in mods for a in _QUANT_ATTRS):
        return None
    fused = copy.copy(first)
    for k in keys:
        fused[k] = mx.concatenate([m[k] for m in mods], axis=0)
    mx.eval([fused[k] for k in keys])
    start = 0
    for m in mods:
        n = m["weight"].shape[0]
        for k in keys:
            m[k] = fused[k][start:start + n]
        start += n
    return fused


class _FusedLayer:
    def __init__(self, layer: nn.Module):
        attn = layer.self_attn
        self.qkv = stack_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp = layer.mlp
        self.gate_up = None
        if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):  # dense MLP, not MoE
            self.gate_up = stack_linears([mlp.gate_proj, mlp.up_proj])
            self.hidden = mlp.gate_proj["weight"].shape[0]
        self.views = self._weights(layer)

    @staticmethod
    def _weights(layer: nn.Module) -> list:
        attn, mlp = layer.self_attn, layer.mlp
        mods = [attn.q_proj, attn.k_proj, attn.v_proj] + [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")]
        return [m.get("weight") if m is not None else None for m in mods]

    def current(self, layer: nn.Module) -> bool:
        """False once someone replaced the layer's weights (load_weights, quantize): stack again."""
        return all(a is b for a, b in zip(self.views, self._weights(layer)))


class FastDecoder:
    """The single-token step for one model; stacks its projection weights once, in place."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = []
        for layer in model.layers:
            self.layers.append(_FusedLayer(layer))
            mx.clear_cache()
        # The cache list and position this decoder last stepped: the next token of the same generation
        # needs only the cheap per-token checks (the full ones cost ~10 us per layer in Python).
        self.cache_ref = None
        self.next_offset = -1

    def refresh(self) -> None:
        """Stack again any layer whose weights were replaced (load_weights, quantize) since."""
        for i, layer in enumerate(self.model.layers):
            if not self.layers[i].current(layer):
                self.layers[i] = _FusedLayer(layer)

    def __call__(self, token: mx.array, cache: list) -> mx.array:
        """Logits (1, vocab) for one token; writes its keys and values into `cache`."""
        inner = self.model.model
        h = inner.embed_tokens(token.reshape(1, 1))
        for layer, fused, c in zip(inner.layers, self.layers, cache):
            h = self._layer(layer, fused, h, c)
        out = inner.norm(h)
        if self.model.args.tie_word_embeddings:
            logits = inner.embed_tokens.as_linear(out)
        else:
            logits = self.model.lm_head(out)
        return logits[:, -1, :]

    @staticmethod
    def _layer(layer: nn.Module, fused: _FusedLayer, h: mx.array, cache: KVCache) -> mx.array:
        attn = layer.self_attn
        nh, nkv = attn.n_heads, attn.n_kv_heads
        x = layer.input_layernorm(h)
        if fused.qkv is not None:
            qkv = fused.qkv(x).reshape(1, 1, nh + 2 * nkv, -1).transpose(0, 2, 1, 3)
            qk = attn.rope(qkv[:, :nh + nkv], offset=cache.offset)
            q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]
        else:
            q = attn.rope(attn.q_proj(x).reshape(1, 1, nh, -1).transpose(0, 2, 1, 3), offset=cache.offset)
            k = attn.rope(attn.k_proj(x).reshape(1, 1, nkv, -1).transpose(0, 2, 1, 3), offset=cache.offset)
            v = attn.v_proj(x).reshape(1, 1, nkv, -1).transpose(0, 2, 1, 3)
        k, v = cache.update_and_fetch(k, v)
        o = scaled_dot_product_attention(q, k, v, cache=cache, scale=attn.scale, mask=None)
        # (1, heads, 1, dim) holds its values in (1, 1, heads * dim) order already: no transpose copy.
        h = h + attn.o_proj(o.reshape(1, 1, -1))
        x = layer.post_attention_layernorm(h)
        if fused.gate_up is not None:
            gu = fused.gate_up(x)
            return h + layer.mlp.down_proj(swiglu(gu[..., :fused.hidden], gu[..., fused.hidden:]))
        return h + layer.mlp(x)


def _unsharded(layer: nn.Module) -> bool:
    attn = layer.self_attn
    return (type(attn.q_proj) in _LINEAR and type(attn.o_proj) in _LINEAR
            and getattr(layer.mlp, "sharding_group", None) is None
            and all(type(m) in _LINEAR for m in (getattr(layer.mlp, "down_proj", None),) if m is not None))


def fast_decode_applies(model: nn.Module, cache: list) -> bool:
    """True when the fast step computes what `model(token, cache)` would."""
    from qwen2_mlx.models.model import Model

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


def fast_decoder(model: nn.Module) -> FastDecoder:
    """The model's decoder, made once per model (it stacks the weights on first use)."""
    dec = getattr(model, "_qwen2_mlx_fast_decoder", None)
    if dec is None:
        dec = FastDecoder(model)
        object.__setattr__(model, "_qwen2_mlx_fast_decoder", dec)
    return dec


def decode_step(model: nn.Module, token: mx.array, cache: list) -> Optional[mx.array]:
    """Logits (1, vocab) of one token through the fast step, or None when it does not apply."""
    if token.size != 1 or os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return None
    dec = getattr(model, "_qwen2_mlx_fast_decoder", None)
    continuing = (dec is not None and dec.cache_ref is cache and cache[0].offset == dec.next_offset
                  and type(cache[0]) is KVCache and type(cache[-1]) is KVCache)
    if not continuing:
        if not fast_decode_applies(model, cache):
            return None
        dec = fast_decoder(model)
        dec.refresh()
        dec.cache_ref = cache
    logits = dec(token, cache)
    dec.next_offset = cache[0].offset
    return logits
