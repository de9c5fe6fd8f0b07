"""`python -m qwen2_mlx.bench.beyond_window`: a pass key past the trained window, three ways, side by side.

One prompt of about `--length` tokens (longer than the model's trained window) hides a 5-digit key at
`--depth` of repetitive filler (eval/prompts.py, the passkey eval's), in the form a chat sends it: the
user message through the chat template, no answer prefix (bench.long_read reads the same one). It is answered by
  ours     `load(path)` with no switch: long context is on by default (DCA, 4 windows);
  off      `load(path, long_context="off")`: plain attention, the trained window: expected to refuse;
  mlx-lm   `mlx_lm.load` and `mlx_lm.generate` on the same folder, with mlx-lm's defaults.
Each row says what came back, whether it is the key, the wall time, and the peak MLX memory of that
row alone. Minutes of CPU per row at 36K tokens: run it once, in the background.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Optional

ENGINES = ("ours", "off", "mlx-lm")
MAX_NEW_TOKENS = 16  # "The pass key is 12345." with room to spare


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.beyond_window", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder (float32 is the fast type on a CPU)")
    p.add_argument("--length", type=int, default=36000, help="prompt tokens (default %(default)s)")
    p.add_argument("--depth", type=float, default=0.5, help="where the key sits, 0..1 (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the key (default %(default)s)")
    p.add_argument("--engines", default=",".join(ENGINES), help="rows to run, in order (default %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ours(path: str, tokens: list[int], long_context: str) -> str:
    from qwen2_mlx.generation.generate import generate
    from qwen2_mlx.loading.loader import load

    model, tokenizer = load(path, long_context=long_context)
    step, shown = max(1, len(tokens) // 20), [0]

    def progress(done: int, total: int) -> None:
        if done - shown[0] >= step or done == total:  # about every 5 %, whatever the prefill step
            shown[0] = done
            _log(f"  prefill {done}/{total}")

    return str(generate(model, tokenizer, tokens, max_tokens=MAX_NEW_TOKENS, prompt_progress_callback=progress))


def _mlx_lm(path: str, tokens: list[int]) -> str:
    from mlx_lm import generate, load

    model, tokenizer = load(path)
    return generate(model, tokenizer, tokens, max_tokens=MAX_NEW_TOKENS)


def run_row(engine: str, path: str, tokens: list[int], expected: str) -> dict:
    """One engine's answer to the prompt: text, verdict, seconds, peak memory (or the refusal)."""
    import mlx.core as mx

    from qwen2_mlx.eval.prompts import first_number
    from qwen2_mlx.generation.responses import ContextOverflowError

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    try:
        got = (
            _mlx_lm(path, tokens) if engine == "mlx-lm" else _ours(path, tokens, "auto" if engine == "ours" else "off")
        )
    except ContextOverflowError as e:
        return {"engine": engine, "refused": str(e), "seconds": round(time.perf_counter() - tic, 1)}
    return {
        "engine": engine,
        "got": got.strip(),
        "ok": first_number(got) == expected,
        "seconds": round(time.perf_counter() - tic, 1),
        "peak_gb": round(mx.get_peak_memory() / 1e9, 3),
    }


def _line(row: dict) -> str:
    if "refused" in row:
        return f"{row['engine']:<7} refused ({row['seconds']} s): {row['refused']}"
    verdict = "found" if row["ok"] else "MISSED"
    return f"{row['engine']:<7} {verdict:<6} got {row['got']!r}  {row['seconds']} s  peak {row['peak_gb']} GB"


def main(argv: Optional[list] = None) -> int:
    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)
    args = _parser().parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        _parser().error(f"--engines: choose from {', '.join(ENGINES)}, got {args.engines!r}")
    if not 0 <= args.depth <= 1:
        _parser().error(f"--depth must be within 0..1, got {args.depth}")
    from qwen2_mlx.bench.compare import machine_description
    from qwen2_mlx.eval.prompts import passkey_prompt, random_key
    from qwen2_mlx.eval.results import write_json
    from qwen2_mlx.loading.tokenizer import load_tokenizer

    key = random_key(args.seed, 0)
    prompt = passkey_prompt(load_tokenizer(Path(args.model)), args.length, args.depth, key, answer_prefix="")
    _log(f"prompt: {len(prompt.tokens)} tokens, key {key} at token {prompt.needle_token} ({args.depth:.0%})")
    rows = []
    for engine in engines:
        _log(f"{engine}: answering")
        rows.append(run_row(engine, args.model, prompt.tokens, prompt.expected))
        print(_line(rows[-1]), flush=True)
    if args.json is not None:
        summary = {"model": args.model, "tokens": len(prompt.tokens), "key": key, "depth": args.depth, "rows": rows}
        write_json(args.json, {**summary, "machine": machine_description()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
