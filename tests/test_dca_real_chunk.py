"""DCA at the real chunk size (32768/4096) with the real model's weights, against the float64 reference.

The GPU run lost every needle past the first DCA chunk while the CPU found them all: MLX's CUDA rope
gave a broadcast input's batch copies one shared output, so the decode step's three query rotations
overwrote each other. Tiny random models at small chunks never reached that code with realistic
queries, so this test drives the real layer 0 projections (their outlier dimensions included) at
positions past two periods of the real geometry, decode and prefill, in float32 and bfloat16, on
whatever device MLX runs on: on CUDA it is the check that catches that bug.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from dca_reference import attention as reference_attention

from qwen2_mlx.models.dca import DCAGeometry, dca_attention, rotate_keys

pytestmark = pytest.mark.real_model

CHUNK, LOCAL = 32768, 4096
PERIOD = CHUNK - LOCAL


@pytest.fixture(scope="module")
def layer0_qkv(real_model):
    """Un-rotated q, k, v (heads, positions, head_dim) of the real layer 0 over 2 periods + 1,000 tokens."""
    model, tokenizer = real_model
    text = "Dual Chunk Attention keeps every position inside the trained window. 双块注意力。\n" * 40
    ids = tokenizer.encode(text)
    length = 2 * PERIOD + 1000
    ids = mx.array((ids * (length // len(ids) + 1))[:length])[None]
    layer = model.model.layers[0]
    attn = layer.self_attn
    x = layer.input_layernorm(model.model.embed_tokens(ids))
    heads = lambda proj, n: proj(x).reshape(1, length, n, -1).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = heads(attn.q_proj, attn.n_heads), heads(attn.k_proj, attn.n_kv_heads), heads(attn.v_proj, attn.n_kv_heads)
    mx.eval(q, k, v)
    return q, k, v, attn


def _ours(q, k, v, attn, first: int, last: int, dtype):
    """Our DCA for queries first..last-1 over keys 0..last-1, keys stored as the cache stores them."""
    geom = DCAGeometry(CHUNK, LOCAL)
    keys = rotate_keys(attn.rope, k[:, :, :last].astype(dtype), 0, geom)
    out = dca_attention(
        q[:, :, first:last].astype(dtype), keys, v[:, :, :last].astype(dtype), first, attn.rope, attn.scale, geom
    )
    return np.array(out.astype(mx.float32))[0]


def _reference(q, k, v, attn, first: int, last: int, dtype):
    """Float64 DCA of the same inputs, rounded to `dtype` first: what is left is our arithmetic's error."""
    q, k, v = (a.astype(dtype).astype(mx.float32) for a in (q, k, v))
    inv_freq = attn.rope.inv_freq  # the real model's plain RoPE frequencies (no scaling under DCA)
    as64 = lambda a: np.array(a[0].astype(mx.float32), dtype=np.float64)  # noqa: E731
    return reference_attention(
        as64(q[:, :, first:last]), as64(k[:, :, :last]), as64(v[:, :, :last]), inv_freq, CHUNK, LOCAL, first_query=first
    )


# bfloat16: the cache holds keys rounded after rotation, which moves layer 0's attention-sink logits
# (up to ~1,100) by whole units: measured 0.01-0.23 here, and plain SDPA in bfloat16 is off by 0.15 at
# a position inside the window. A wrong rotation or mask is off by far more.
@pytest.mark.parametrize("dtype,tol", [(mx.float32, 2e-3), (mx.bfloat16, 0.3)])
@pytest.mark.parametrize(
    "first,last",
    [
        (PERIOD + 4000, PERIOD + 4001),  # decode in chunk 1, within the local window: exact positions
        (2 * PERIOD + 999, 2 * PERIOD + 1000),  # decode in chunk 2: intra, successive and inter copies
        (2 * PERIOD - 8, 2 * PERIOD + 8),  # a prefill step across the second chunk edge
    ],
)
def test_real_layer_dca_matches_reference(layer0_qkv, dtype, tol, first, last):
    q, k, v, attn = layer0_qkv
    ours = _ours(q, k, v, attn, first, last, dtype)
    ref = _reference(q, k, v, attn, first, last, dtype)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < tol, f"DCA at positions {first}..{last - 1} (chunk {CHUNK}/{LOCAL}, {dtype}) is off by {err:.3g}"
