"""`python -m qwen2_mlx.bench.reading_time`: the chat's reading-time estimate against a real read.

Measures the model's reading speed as the chat app does before a file is sent (a 256-token read and the
attention's cost per key: qwen2_mlx.generation.reading_time), then reads a `--tokens` document (the
pass-key filler) in prefill steps and prints, at each step, the seconds it really took so far, the
estimate, and what a flat tokens/s from the short read would have said.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional


def _document(tokenizer, tokens: int) -> list[int]:
    from qwen2_mlx.eval.prompts import passkey_prompt, random_key

    return passkey_prompt(tokenizer, tokens, 0.5, random_key(0, 0), "").tokens


def main(argv: Optional[list] = None) -> int:
    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)
    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.reading_time", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--tokens", type=int, default=8192, help="document length (default %(default)s)")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)

    from qwen2_mlx.generation.generate import prefill_prompt_cache
    from qwen2_mlx.generation.reading_time import measure_reading_speed
    from qwen2_mlx.loading.loader import load

    model, tokenizer = load(args.model)
    tic = time.perf_counter()
    speed = measure_reading_speed(model, tokenizer)
    print(f"calibration: {time.perf_counter() - tic:.1f} s; {1 / speed.seconds_per_token:,.0f} tokens/s without "
          f"attention, {speed.seconds_per_key * 1e9:,.2f} ns per token and key")  # fmt: skip
    ids = _document(tokenizer, args.tokens)
    flat = speed.tokens_per_s(0, 256)
    rows, start = [], time.perf_counter()

    def progress(done: int, total: int) -> None:
        real = time.perf_counter() - start
        row = {"done": done, "seconds": round(real, 1), "estimate": round(speed.seconds(0, done), 1),
               "flat_estimate": round(done / flat, 1)}  # fmt: skip
        rows.append(row)
        print(f"{done:>7,} tokens  read in {real:8.1f} s  estimate {row['estimate']:8.1f} s  "
              f"flat {row['flat_estimate']:8.1f} s", flush=True)  # fmt: skip

    print(f"reading {len(ids):,} tokens in steps of {args.prefill_step_size:,}")
    prefill_prompt_cache(model, tokenizer, ids, prefill_step_size=args.prefill_step_size,
                         prompt_progress_callback=progress)  # fmt: skip
    if args.json is not None:
        per = {"seconds_per_token": speed.seconds_per_token, "seconds_per_key": speed.seconds_per_key}
        args.json.write_text(json.dumps({"model": args.model, "speed": per, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
