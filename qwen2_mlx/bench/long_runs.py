"""The measurements behind `python -m qwen2_mlx.bench.long`: DCA against plain attention, speed and memory."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from qwen2_mlx.loading.loader import load_model
from qwen2_mlx.models.config import DCAConfig, ModelArgs
from qwen2_mlx.models.model import Model
from qwen2_mlx.models.stacked import share_stacks

# Wall-clock seconds by default; `--cpu-time` counts this process's CPU seconds instead, which a
# CPU-only machine shared with other jobs inflates far less (GPU work is not counted by it).
clock = time.perf_counter


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def twin(model: Model, dca: DCAConfig | None) -> Model:
    """The same weights (shared, not copied) under other long-context settings."""
    other = Model(replace(model.args, dual_chunk_attention_config=dca))
    other.update(model.parameters())
    share_stacks(model, other)
    other.eval()
    return other


def prefill(model: Model, tokens: mx.array, step: int) -> tuple[list, float]:
    """generate.py's chunked prefill; returns the cache and seconds taken (see `clock`)."""
    cache = model.make_cache()
    for c in cache:
        if hasattr(c, "length_hint"):
            c.length_hint = tokens.size
    mx.synchronize()
    tic = clock()
    for s in range(0, tokens.size, step):
        model(tokens[s : s + step][None], cache=cache)
        mx.eval([c.state for c in cache])
    mx.synchronize()
    return cache, clock() - tic


def decode(model: Model, cache: list, first: int, n: int) -> float:
    """Greedy decode n tokens (after one warm-up step); tokens per second from the median step,
    which shrugs off the stalls of a shared machine."""
    y = mx.array([[first]])
    y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)[None]
    mx.eval(y)
    times = []
    for _ in range(n):
        tic = clock()
        y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)[None]
        mx.eval(y)
        times.append(clock() - tic)
    return 1.0 / float(np.median(times))


def bench_real(
    path: Path,
    chunk: int,
    local: int,
    n_decode: int,
    step: int,
    random_weights: bool = False,
    lengths: list[int] | None = None,
    dtype: mx.Dtype = mx.float32,
) -> list[dict]:
    """Decode and prefill speed of DCA against plain attention at `lengths` (default 1, 2 and 4 chunks)."""
    dtype_name = str(dtype).split(".")[-1]
    if random_weights:  # same shapes, hence same speed; for machines the weights cannot be copied to
        log(f"random {dtype_name} weights with the shapes of {path}/config.json")
        mx.random.seed(0)
        plain = Model(replace(ModelArgs.from_file(path / "config.json"), quantization=None))
        plain.set_dtype(dtype)
        mx.eval(plain.parameters())
    else:
        log(f"loading {path} in {dtype_name}")
        plain = load_model(path, dtype=dtype)
    plain = twin(plain, None)
    dca = twin(plain, DCAConfig(chunk, local, 0))
    rng = np.random.default_rng(0)
    vocab = plain.args.vocab_size
    warm = mx.array(rng.integers(0, 1000, chunk + 64), dtype=mx.uint32)  # both paths, briefly
    for m in (plain, dca):  # first-call costs (allocation, kernels) out of the timed runs
        prefill(m, warm, step)
    print(
        f"model {path} ({dtype_name}{', random weights' if random_weights else ''}) on {mx.default_device()}, "
        f"DCA chunk_size {chunk}, local_size {local} (period {chunk - local}); prefill step {step}, "
        f"{n_decode} decode tokens; {'CPU' if clock is time.process_time else 'wall'} time"
    )
    print(
        f"{'context':>8} | {'decode plain':>12} {'decode DCA':>11} {'ratio':>6} | "
        f"{'prefill plain':>13} {'prefill DCA':>12} {'ratio':>6}"
    )
    rows = []
    for i, L in enumerate(lengths or [n * chunk for n in (1, 2, 4)]):
        toks = mx.array(rng.integers(0, min(vocab, 150000), L), dtype=mx.uint32)
        row = {"context": L}
        # Alternate which path goes first, so a machine that slows down over time hits both alike.
        order = (("plain", plain), ("dca", dca)) if i % 2 == 0 else (("dca", dca), ("plain", plain))
        for name, m in order:
            log(f"{name}: prefill {L} tokens")
            cache, secs = prefill(m, toks, step)
            row[f"prefill {name}"] = L / secs
            log(f"{name}: decode {n_decode} tokens at {L}")
            row[f"decode {name}"] = decode(m, cache, int(toks[-1].item()), n_decode)
            del cache
            mx.clear_cache()
        print(
            f"{L:>8} | {row['decode plain']:>10.2f}/s {row['decode dca']:>9.2f}/s "
            f"{row['decode dca'] / row['decode plain']:>6.2f} | {row['prefill plain']:>11.1f}/s "
            f"{row['prefill dca']:>10.1f}/s {row['prefill dca'] / row['prefill plain']:>6.2f}",
            flush=True,
        )
        rows.append(row)
    print("goals: decode DCA/plain >= 0.8 at each length; prefill DCA/plain >= 0.7 at 4 chunks")
    return rows


def small_model(args: ModelArgs | None) -> Model:
    """Two layers with the real model's attention shape (heads, KV heads, head dim), random weights."""
    base = dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=2,
        intermediate_size=1024,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=1024,
        rope_theta=1e6,
    )
    if args is not None:
        base.update(
            hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_key_value_heads,
            rope_theta=args.rope_theta,
        )
    mx.random.seed(0)
    m = Model(ModelArgs(**base))
    mx.eval(m.parameters())
    return m


def bench_memory(args: ModelArgs | None, lengths: list[int], chunk: int, local: int, step: int) -> list[dict]:
    """Peak memory (MB above the weights) of a prefill, plain against DCA, on a small random model."""
    plain = small_model(args)
    dca = twin(plain, DCAConfig(chunk, local, 0))
    a = plain.args
    print(
        f"\npeak memory of a prefill (small random model: {a.num_hidden_layers} layers, heads "
        f"{a.num_attention_heads}/{a.num_key_value_heads}, head dim {a.head_dim}, float32; prefill step {step}; "
        f"DCA chunk_size {chunk}, local_size {local})"
    )
    print(f"{'tokens':>8} | {'plain peak':>10} {'DCA peak':>10} | {'KV cache':>9}  (MB; peak above weights)")
    weights = sum(v.nbytes for _, v in tree_flatten(plain.parameters()))
    rng = np.random.default_rng(1)
    rows = []
    for L in lengths:
        toks = mx.array(rng.integers(0, a.vocab_size, L), dtype=mx.uint32)
        row = {"tokens": L}
        for name, m in (("plain", plain), ("dca", dca)):
            mx.clear_cache()
            mx.reset_peak_memory()
            log(f"{name}: prefill {L} tokens")
            cache, _ = prefill(m, toks, step)
            row[name] = (mx.get_peak_memory() - weights) / 2**20
            kv = sum(c.keys[..., : c.offset, :].nbytes + c.values[..., : c.offset, :].nbytes for c in cache) / 2**20
            del cache
        row["kv_cache"] = kv
        print(f"{L:>8} | {row['plain']:>10.0f} {row['dca']:>10.0f} | {kv:>9.0f}", flush=True)
        rows.append(row)
    print("goal: DCA peak grows linearly with the length (no L x L term)")
    return rows
