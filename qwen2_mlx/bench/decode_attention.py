"""`python -m qwen2_mlx.bench.decode_attention`: one decoded token's attention, the two ways, paired.

For each cache length: MLX's fused attention against `few_query_attention` (two matmuls and a softmax)
for plain attention, and DCA's fused decode against its matmul step, on random tensors of a model's
attention shape (default: Qwen2-0.5B's 14 query and 2 KV heads of 64), timed for `--layers` layers in
alternating order so that both share the machine's load; prints the medians, the median of the paired
ratios and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional


def _time(fn, layers: int) -> float:
    import mlx.core as mx

    tic = time.perf_counter()
    for _ in range(layers):
        mx.eval(fn())
    return time.perf_counter() - tic


def _pair(a, b, runs: int, layers: int) -> tuple[float, float, float]:
    """Medians of a's and b's times and of their per-run ratios a/b, alternating which goes first."""
    ta, tb = [], []
    for i in range(runs):
        order = ((a, ta), (b, tb)) if i % 2 else ((b, tb), (a, ta))
        for fn, out in order:
            out.append(_time(fn, layers))
    ratios = sorted(x / y for x, y in zip(ta, tb))

    def median(x):
        return sorted(x)[len(x) // 2]

    return median(ta), median(tb), ratios[len(ratios) // 2]


def _row(name: str, n: int, a, b, runs: int, layers: int) -> None:
    import mlx.core as mx

    diff = mx.abs(a() - b()).max().item()
    fused, matmul, ratio = _pair(a, b, runs, layers)
    print(f"{name:<6} {n:>7,} | {fused * 1e3:9.1f} ms {matmul * 1e3:9.1f} ms | {ratio:12.2f}x | {diff:.1e}", flush=True)


def _length(n: int, hq: int, hkv: int, d: int, rope, geom, args) -> None:
    """The two rows of one cache length, on random tensors of the attention shape."""
    import mlx.core as mx

    from qwen2_mlx.models.attention import few_query_attention
    from qwen2_mlx.models.dca import _decode_fused, _decode_step

    q = mx.random.normal((1, hq, 1, d)) * d**-0.5
    k, v = mx.random.normal((1, hkv, n, d)), mx.random.normal((1, hkv, n, d))
    mx.eval(q, k, v)
    _row("plain", n, lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0),
         lambda: few_query_attention(q, k, v, 1.0, causal=False), args.runs, args.layers)  # fmt: skip
    _row("DCA", n, lambda: _decode_fused(q, k, v, n - 1, rope, geom),
         lambda: _decode_step(q, k, v, n - 1, rope, geom, hq // hkv), args.runs, args.layers)  # fmt: skip


def main(argv: Optional[list] = None) -> int:
    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)
    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.decode_attention", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="2048,8192,30000,36000", help="cache lengths (default %(default)s)")
    p.add_argument("--heads", default="14,2,64", help="query heads, KV heads, head dim (default %(default)s)")
    p.add_argument("--chunk-size", type=int, default=32768, help="DCA chunk_size (default %(default)s)")
    p.add_argument("--local-size", type=int, default=4096, help="DCA local_size (default %(default)s)")
    p.add_argument("--layers", type=int, default=24, help="layers a timed run covers (default %(default)s)")
    p.add_argument("--runs", type=int, default=20, help="paired runs per row (default %(default)s)")
    args = p.parse_args(argv)
    import mlx.core as mx
    import mlx.nn as nn

    from qwen2_mlx.models.dca import DCAGeometry

    hq, hkv, d = (int(x) for x in args.heads.split(","))
    geom, rope = DCAGeometry(args.chunk_size, args.local_size, args.chunk_size), nn.RoPE(d, base=1e6)
    print(f"device {mx.default_device()}; {hq}/{hkv} heads of {d}; DCA {args.chunk_size}/{args.local_size}; "
          f"times per {args.layers} layers, medians of {args.runs} paired runs")  # fmt: skip
    print("path    length |        fused        matmul | fused/matmul | max diff")
    for n in (int(x) for x in args.lengths.split(",")):
        _length(n, hq, hkv, d, rope, geom, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
