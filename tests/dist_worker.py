"""The ranks of the distributed parity tests: load each model sharded, record logits and greedy tokens.

Run under `mlx.launch`. Several models go through one launch because starting the ranks (importing
mlx-lm, transformers and torch) costs more than the tiny models themselves. For model i rank 0
writes `out/i.npz`: the logits of every prompt position, the greedy tokens, every rank's sampled tokens,
the rank count, each rank's parameter count, KV-cache layer count and peak memory after loading in GB
(MLX allocator, process RSS), greedy tokens again with a prefill in chunks of 8, with prompt lookup and with
an 8-bit KV cache (`extra_runs`), and a two-prompt batch's tokens.
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler

from qwen2_mlx.distributed import peak_rss_gb
from qwen2_mlx.generation.batch import batch_generate
from qwen2_mlx.generation.generate import generate_step
from qwen2_mlx.loading.sharded import sharded_load


def extra_runs(model, tokens: mx.array, n: int) -> dict:
    """Greedy tokens with an 8-bit KV cache (where head_dim allows 32-wide groups) and with prompt lookup."""
    out = {"lookup": np.array([t for t, *_ in generate_step(tokens, model, max_tokens=n, lookup=True)])}
    if model.args.head_dim % 32 == 0:
        kv = dict(kv_bits=8, kv_group_size=32, prefill_step_size=8)
        out["kv8"] = np.array([t for t, _ in generate_step(tokens, model, max_tokens=n, **kv)])
    return out


def run(path: str, prompt: list, n: int, out: Path, group, parallel: str) -> None:
    mx.reset_peak_memory()
    model, tokenizer = sharded_load(path, group, dtype=mx.float32, parallel=parallel)
    loaded_peak = mx.get_peak_memory()
    tokens = mx.array(prompt, dtype=mx.uint32)
    logits = model(tokens[None])[0]
    greedy = [t for t, _ in generate_step(tokens, model, max_tokens=n)]
    # Chunked prefill evaluates only the caches: the pipeline's sends must still happen.
    chunked = [t for t, _ in generate_step(tokens, model, max_tokens=n, prefill_step_size=8)]
    extras = extra_runs(model, tokens, n)
    batch = batch_generate(model, tokenizer, [prompt, prompt[:12]], max_tokens=n)
    # Sampling at temperature 1 with the same seed must pick the same tokens on every rank (4 suffice).
    mx.random.seed(7)
    sampled = [t for t, _ in generate_step(tokens, model, max_tokens=min(n, 4), sampler=make_sampler(temp=1.0))]
    sampled = mx.distributed.all_gather(mx.array([sampled]), group=group)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    params = mx.distributed.all_gather(mx.array([n_params]), group=group)
    cache_layers = mx.distributed.all_gather(mx.array([len(model.make_cache())]), group=group)
    peaks = mx.distributed.all_gather(mx.array([[loaded_peak / 1e9, peak_rss_gb()]]), group=group)
    mx.eval(logits, params, peaks, sampled, cache_layers)
    if group.rank() == 0:
        np.savez(
            out,
            logits=np.array(logits),
            greedy=np.array(greedy),
            size=group.size(),
            params=np.array(params),
            peaks=np.array(peaks),
            sampled=np.array(sampled),
            cache_layers=np.array(cache_layers),
            chunked=np.array(chunked),
            **extras,
            batch=np.array([t[:n] + [-1] * (n - len(t[:n])) for t in batch.token_ids]),
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", help="folder for the results")
    p.add_argument("prompt", help="JSON list of prompt token ids")
    p.add_argument("n", type=int, help="greedy tokens to generate")
    p.add_argument("models", nargs="+")
    p.add_argument("--parallel", default="tensor", choices=("tensor", "pipeline"))
    a = p.parse_args()
    group = mx.distributed.init(backend="ring", strict=True)
    for i, path in enumerate(a.models):
        run(path, json.loads(a.prompt), a.n, Path(a.out) / f"{i}.npz", group, a.parallel)


if __name__ == "__main__":
    main()
