"""Benchmark: saving and loading a large KV-cache file, to price its checksum and checks.

    python -m qwen2_mlx.bench.cache_file [--mb 200] [--runs 5] [--dir DIR]

Builds a float32 cache of Qwen2.5-0.5B's shape (24 layers, 2 KV heads of 64) holding about `--mb`
megabytes of random keys and values, then times `save_prompt_cache` and `load_prompt_cache` (with
every array evaluated) `--runs` times and prints the medians. The file is read back from the page
cache, as when a chat is reopened soon after it was saved. Only the public functions are used, so
the same command measures any version of the package.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

LAYERS, HEADS, HEAD_DIM = 24, 2, 64


def build_cache(megabytes: float) -> list:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    per_token = LAYERS * 2 * HEADS * HEAD_DIM * 4
    tokens = max(1, int(megabytes * 1e6 / per_token))
    cache = []
    for _ in range(LAYERS):
        c = KVCache()
        k = mx.random.normal((1, HEADS, tokens, HEAD_DIM))
        v = mx.random.normal((1, HEADS, tokens, HEAD_DIM))
        c.update_and_fetch(k, v)
        cache.append(c)
    mx.eval([c.state for c in cache])
    return cache


def measure(cache: list, folder: Path, runs: int) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from qwen2_mlx.generation.prompt_cache import load_prompt_cache, save_prompt_cache

    path = folder / "bench.safetensors"
    saves, loads = [], []
    for _ in range(runs):
        tic = time.perf_counter()
        save_prompt_cache(path, cache)
        saves.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        loaded = load_prompt_cache(path)
        mx.eval([a for c in loaded for _, a in tree_flatten(c.state) if isinstance(a, mx.array)])
        loads.append(time.perf_counter() - tic)
        del loaded
    return {"bytes": path.stat().st_size, "save": statistics.median(saves), "load": statistics.median(loads)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.cache_file", description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=200, help="cache size in megabytes (default 200)")
    p.add_argument("--runs", type=int, default=5, help="saves and loads timed (default 5)")
    p.add_argument("--dir", type=Path, default=None, help="where the file is written (default: a temporary folder)")
    args = p.parse_args(argv)
    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)
    cache = build_cache(args.mb)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        r = measure(cache, Path(tmp), max(1, args.runs))
    try:
        from qwen2_mlx.generation.cache_integrity import default_algorithm

        checksum = default_algorithm()
    except ImportError:  # a version without checksums
        checksum = "none"
    print(f"cache file:  {r['bytes'] / 1e6:,.1f} MB ({LAYERS} layers), checksum: {checksum}")
    print(f"save:        {r['save']:.3f}s (median of {args.runs})")
    print(f"load:        {r['load']:.3f}s (median of {args.runs}, arrays evaluated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
