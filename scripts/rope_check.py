#!/usr/bin/env python3
"""The GPU run's first step (docs/gpu-run.md): MLX's rope on a broadcast batch, and DCA's decode step.

1. `mx.fast.rope` of `mx.broadcast_to(q, (3, H, 1, D))` with an array of three offsets, against the
   same on a contiguous copy and against three int-offset calls, in bfloat16 and float32. On CUDA (mlx
   0.32) the broadcast input's copies overwrite each other: the printed difference documents it.
2. `dca_attention` of one new token (its `_decode_step`) past two chunks, against the float64 reference
   of tests/dca_reference.py, on random data at the real chunk size. Exit 1 if it is off.

    python scripts/rope_check.py [--chunk 32768 --local 4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import dca_reference as ref  # noqa: E402

from qwen2_mlx.models.dca import DCAGeometry, dca_attention  # noqa: E402

BASE = 1e6  # the real model's rope_theta
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}  # relative to the largest output


def rope_broadcast(dtype, H: int = 14, D: int = 64) -> dict:
    """Max |difference| of the broadcast-batch rope against a contiguous batch and three int-offset calls."""
    q = mx.random.normal((1, H, 1, D)).astype(dtype)
    offsets = [8191, 4097, 3]
    rope = lambda x, off: mx.fast.rope(x, D, traditional=False, base=BASE, scale=1.0, offset=off)  # noqa: E731
    view = rope(mx.broadcast_to(q, (3, H, 1, D)), mx.array(offsets))
    copy = rope(mx.contiguous(mx.broadcast_to(q, (3, H, 1, D))), mx.array(offsets))
    each = mx.concatenate([rope(q, o) for o in offsets], axis=0)
    f = lambda a, b: mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item()  # noqa: E731
    return {
        "broadcast-vs-contiguous": f(view, copy),
        "broadcast-vs-int": f(view, each),
        "contiguous-vs-int": f(copy, each),
    }


def decode_step(dtype, chunk: int, local: int, Hq: int = 14, Hkv: int = 2, D: int = 64) -> float:
    """Max |difference| (relative) of one decoded token's attention at ~2.5 chunks against float64."""
    geom = DCAGeometry(chunk, local)
    L = 2 * geom.period + geom.period // 2 + 1  # keys 0..L-1: the inter, succ and intra ranges all present
    rng = np.random.default_rng(0)
    # A sharp query (logits of std 3) so that a wrongly rotated copy picks other keys, not a near-uniform mean.
    q, k, v = 3 * rng.standard_normal((Hq, 1, D)), rng.standard_normal((Hkv, L, D)), rng.standard_normal((Hkv, L, D))
    inv_freq = 1.0 / BASE ** (np.arange(0, D, 2) / D)
    want = ref.attention(q, k, v, inv_freq, chunk, local, first_query=L - 1)
    k_rot = ref.rotate(k, np.arange(L) % geom.period, inv_freq)  # the cache holds keys at j mod c
    rope = lambda x, offset: mx.fast.rope(x, D, traditional=False, base=BASE, scale=1.0, offset=offset)  # noqa: E731
    got = dca_attention(
        mx.array(q[None], dtype=dtype),
        mx.array(k_rot[None], dtype=dtype),
        mx.array(v[None], dtype=dtype),
        L - 1,
        rope,
        D**-0.5,
        geom,
    )
    return float(np.max(np.abs(np.array(got.astype(mx.float32))[0] - want)) / np.max(np.abs(want)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk", type=int, default=32768)
    ap.add_argument("--local", type=int, default=4096)
    a = ap.parse_args(argv)
    print(f"device: {mx.default_device()}  mlx {mx.__version__}")
    bad = []
    for name in ("bfloat16", "float32"):
        dtype = getattr(mx, name)
        diffs = " ".join(f"{k} {v:.3g}" for k, v in rope_broadcast(dtype).items())
        print(f"rope {name}: max |diff| {diffs}")
        err = decode_step(dtype, a.chunk, a.local)
        ok = err <= TOLERANCE[name]
        print(
            f"dca decode step {name} (chunk {a.chunk}/{a.local}, ~2.5 chunks) vs float64: "
            f"{err:.3g} relative, {'ok' if ok else 'OFF'}"
        )
        bad += [] if ok else [name]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
