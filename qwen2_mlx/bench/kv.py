"""`python -m qwen2_mlx.bench.kv`: what a quantized KV cache saves and what it changes, on a real model.

For each length, with plain attention and with Dual Chunk Attention, and for a float cache and each
`--kv-bits`: a needle-in-a-haystack prompt is prefilled (memory: bytes the cache holds per token, peak
above the weights during the prefill and during decoding), then 8 tokens are decoded greedily.
Printed against the float cache of the same run: the first answer position's logits (largest
deviation, KL divergence), whether the greedy tokens agree and whether the needle was found.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qwen2_mlx.arguments import DTYPE_NAMES, int_list, mlx_dtype
from qwen2_mlx.loading.paths import default_model_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.kv", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help=f"MLX model folder (default {default_model_path()})")
    p.add_argument("--lengths", default="8192,16384", metavar="N,N", help="prompt lengths (default %(default)s)")
    p.add_argument("--bits", default="8,4", metavar="B,B", help="KV bits to compare with floats (default %(default)s)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64, help="kv_group_size (default 64)")
    p.add_argument("--dca-chunk-size", type=int, default=4096, help="chunk_size of the DCA runs (default 4096)")
    p.add_argument("--dca-local-size", type=int, default=512, help="local_size of the DCA runs (default 512)")
    p.add_argument("--modes", default="plain,dca", help="plain and/or dca (default %(default)s)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="weights and activations (default float32)")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        metavar="N",
        help="keep only the first N layers: memory figures per layer hold, the text is nonsense (long runs on a CPU)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every figure to FILE as JSON")
    args = p.parse_args(argv)
    try:
        lengths = int_list(args.lengths, "--lengths", minimum=64)
        bits = int_list(args.bits, "--bits", minimum=2, maximum=8)
    except ValueError as e:
        p.error(str(e))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("plain", "dca") for m in modes):
        p.error("--modes takes plain, dca or both")
    from qwen2_mlx.loading.loader import ModelLoadError

    try:
        rows = run(args, lengths, bits, modes)
    except (ModelLoadError, ValueError) as e:  # a missing folder, a length too short for the needle
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def held_bytes(c) -> int:
    """Bytes of the tokens a layer's cache holds (its buffers also keep up to 255 columns of spare room)."""
    keys, values = c.keys, c.values
    parts = [*keys, *values] if isinstance(keys, (tuple, list)) else [keys, values]
    return sum(t[..., : c.offset, :].nbytes for t in parts)


def _print_header(a) -> None:
    elements = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim  # keys and values, all layers
    print(
        f"model: {a.num_hidden_layers} layers x {a.num_key_value_heads} KV heads x {a.head_dim}; a token's keys and "
        f"values are {elements} numbers: {elements * 4 / 1024:.1f} KiB in float32, {elements * 2 / 1024:.1f} KiB "
        f"in float16 (computed)"
    )
    print(f"{'tokens':>6} {'mode':>5} {'cache':>7} | {'KiB/token':>9} {'KV MB':>7} {'peak MB':>8} {'decode':>7} "
          f"{'prefill s':>9} | "
          f"{'max |dlogit|':>12} {'KL':>9} {'tokens=':>7} {'found':>5}")  # fmt: skip


def _print_row(row: dict, dtype: str) -> None:
    b = row["kv_bits"]
    name = f"{b}-bit" if b else dtype.replace("float", "f")
    dev = " " * 30
    if b:
        dev = f"{row['max_logit_deviation']:12.4f} {row['kl']:9.2e} {row['same_tokens']!s:>7}"
    print(
        f"{row['tokens']:>6} {row['mode']:>5} {name:>7} | {row['kv_bytes_per_token'] / 1024:9.1f} "
        f"{row['kv_mb']:7.1f} {row['peak_mb_above_weights']:8.1f} {row['decode_peak_mb_above_weights']:7.1f} "
        f"{row['prefill_seconds']:9.1f} | {dev} {row['found']!s:>5}",
        flush=True,
    )


def run(args, lengths: list[int], bits: list[int], modes: list[str]) -> list[dict]:
    import mlx.core as mx
    import numpy as np

    from qwen2_mlx.bench.long_runs import twin
    from qwen2_mlx.eval.niah import cell_seed
    from qwen2_mlx.eval.prompts import first_number, niah_prompt
    from qwen2_mlx.generation.generate import generate_step
    from qwen2_mlx.generation.prompt_cache import make_prompt_cache
    from qwen2_mlx.loading.loader import load
    from qwen2_mlx.models.config import DCAConfig

    model, tok = load(args.model or default_model_path(), dtype=mlx_dtype(args.dtype))
    if args.layers is not None:
        if not 0 < args.layers <= len(model.layers):
            raise ValueError(f"--layers must be between 1 and the model's {len(model.layers)}")
        model.model.layers = model.model.layers[: args.layers]
        model.args.num_hidden_layers = args.layers
    _print_header(model.args)
    rows = []
    weights = mx.get_active_memory()
    for length in lengths:
        prompt = niah_prompt(tok, length, 0.5, cell_seed(0, length, 50, 0))
        ids = mx.array(prompt.tokens, dtype=mx.uint32)
        for mode in modes:
            m = model if mode == "plain" else twin(model, DCAConfig(args.dca_chunk_size, args.dca_local_size, 0))
            ref = None
            for b in [None, *bits]:
                cache = make_prompt_cache(m)
                mx.clear_cache()
                mx.reset_peak_memory()
                tic = time.perf_counter()
                steps = generate_step(
                    ids, m, max_tokens=8, prompt_cache=cache, prefill_step_size=args.prefill_step_size,
                    kv_bits=b, kv_group_size=args.group_size,
                )  # fmt: skip
                out = []
                for t, lp in steps:
                    if not out:
                        seconds = time.perf_counter() - tic
                        first = np.array(lp.astype(mx.float32))
                        peak = (mx.get_peak_memory() - weights) / 2**20
                        mx.reset_peak_memory()  # decoding holds the cache and one step's work
                    out.append(t)
                decode_peak = (mx.get_peak_memory() - weights) / 2**20
                kv_bytes = sum(held_bytes(c) for c in cache)
                text = tok.decode(out)
                row = {
                    "tokens": len(prompt.tokens),
                    "mode": mode,
                    "kv_bits": b,
                    "kv_group_size": args.group_size if b else None,
                    "kv_bytes_per_token": kv_bytes / cache[0].offset,
                    "kv_mb": kv_bytes / 2**20,
                    "peak_mb_above_weights": peak,
                    "decode_peak_mb_above_weights": decode_peak,
                    "prefill_seconds": seconds,
                    "found": first_number(text) == prompt.expected,
                    "answer": text,
                }
                if ref is None:
                    ref = (first, out)
                else:
                    p_ref = np.exp(ref[0])
                    row["max_logit_deviation"] = float(np.abs(first - ref[0]).max())
                    row["kl"] = float((p_ref * (ref[0] - first)).sum())
                    row["same_tokens"] = out == ref[1]
                rows.append(row)
                _print_row(row, args.dtype)
                del cache, steps
    return rows


if __name__ == "__main__":
    sys.exit(main())
