"""Rotary position embeddings: plain, linear and static YaRN, all through `mx.fast.rope`.

YaRN follows transformers' `_compute_yarn_parameters` (what Qwen2 checkpoints were tuned with):
blended inverse frequencies plus an attention factor. The factor multiplies cos and sin in
transformers, i.e. q·k by factor²; we fold factor² into the attention scale instead, so cached keys
stay plain rotated keys and no extra multiply runs per token.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import numpy as np


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_parameters(dims: int, base: float, scaling: dict, max_position_embeddings: int):
    """Return (inv_freq as float64 numpy array of length dims/2, attention_factor)."""
    factor = float(scaling["factor"])
    orig = scaling.get("original_max_position_embeddings") or max_position_embeddings
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    truncate = scaling.get("truncate", True)

    def correction_dim(rotations):
        return (dims * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = np.clip((np.arange(dims // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp

    pos_freqs = base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return inv_freq, float(attention_factor)


def plain_inv_freq(dims: int, base: float) -> np.ndarray:
    return 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float64) / dims))


class RoPE:
    """Rotate-half RoPE at an integer (or array) offset. Holds no trainable parameters.

    `attention_scale` is the multiplier YaRN puts on q·k (1.0 otherwise); the attention module
    multiplies its softmax scale by it.
    """

    def __init__(
        self,
        dims: int,
        base: float = 10000.0,
        traditional: bool = False,
        scaling: Optional[dict] = None,
        max_position_embeddings: int = 32768,
    ):
        self.dims = dims
        self.traditional = traditional
        self.base: Optional[float] = base
        self.scale = 1.0
        self.freqs: Optional[mx.array] = None
        self.attention_scale = 1.0
        rtype = (scaling or {}).get("rope_type", "default")
        if rtype == "linear":
            self.scale = 1.0 / float(scaling["factor"])
        elif rtype == "yarn":
            inv_freq, af = yarn_parameters(dims, base, scaling, max_position_embeddings)
            # mx.fast.rope takes periods (1/inv_freq) in `freqs`, and then no base.
            self.freqs = mx.array((1.0 / inv_freq).astype(np.float32))
            self.base = None
            self.attention_scale = af * af
        # The effective inverse frequencies, for references and DCA's position tables.
        self.inv_freq = plain_inv_freq(dims, base) * self.scale if self.freqs is None else inv_freq

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=self.base,
            scale=self.scale,
            offset=offset,
            freqs=self.freqs,
        )
