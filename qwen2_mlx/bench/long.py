"""Long-context benchmark: Dual Chunk Attention against plain attention at the same lengths.

    python -m qwen2_mlx.bench.long --model PATH [--chunk-size 1024 --local-size 256]

Prints (stdout) decode tok/s at 1, 2 and 4 chunks of context and prefill tok/s of a 4-chunk
prompt, DCA vs plain, on the given model in float32; then peak memory of a long DCA prefill
(16K tokens by default) on a small random model with the real model's attention shape, vs plain.
Figures, not pass/fail: the goals (decode >= 0.8x, prefill >= 0.7x plain, no L x L memory term)
are printed next to them.
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
    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.long", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help=f"MLX model folder (default {default_model_path()})")
    p.add_argument("--chunk-size", type=int, default=1024, help="DCA chunk_size for the real-model runs")
    p.add_argument("--local-size", type=int, default=256, help="DCA local_size for the real-model runs")
    p.add_argument(
        "--lengths",
        type=str,
        default=None,
        help="comma-separated context lengths for the real-model runs (default: 1, 2 and 4 chunks)",
    )
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="weights and activations (default float32)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every figure to FILE as JSON")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--prefill-step-size", type=int, default=2048, help="tokens per prefill step (default 2048)")
    p.add_argument(
        "--memory-lengths",
        type=str,
        default="4096,8192,16384",
        help="comma-separated prompt lengths for the memory runs",
    )
    p.add_argument("--memory-chunk-size", type=int, default=4096)
    p.add_argument("--memory-local-size", type=int, default=512)
    p.add_argument("--skip-real", action="store_true", help="only the small-model memory runs")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU seconds (CPU backend on a shared machine) instead of wall time",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="time random weights of the model's shapes (only config.json is read)",
    )
    a = p.parse_args(argv)
    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)  # Linux CPU: re-run with OpenBLAS preloaded (runtime/blas.py)
    if not 0 < a.local_size < a.chunk_size or not 0 < a.memory_local_size < a.memory_chunk_size:
        p.error("local size must be between 1 and chunk size - 1")
    lengths = _lengths(p, "--memory-lengths", a.memory_lengths) if a.memory_lengths.strip() else []  # "": none
    real_lengths = _lengths(p, "--lengths", a.lengths) if a.lengths is not None else None
    if a.json is not None and not a.json.parent.is_dir():
        p.error(f"--json: the folder {a.json.parent} does not exist")
    from qwen2_mlx.bench import long_runs
    from qwen2_mlx.loading.loader import ModelLoadError
    from qwen2_mlx.models.config import ConfigError, ModelArgs

    if a.cpu_time:
        long_runs.clock = time.process_time
    path = a.model or default_model_path()
    real_args = None
    figures = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    try:
        if not a.skip_real:
            real_args = ModelArgs.from_file(Path(path) / "config.json")
            figures["speed"] = long_runs.bench_real(
                Path(path),
                a.chunk_size,
                a.local_size,
                a.decode_tokens,
                a.prefill_step_size,
                a.random_weights,
                real_lengths,
                mlx_dtype(a.dtype),
            )
        elif a.model is not None:
            real_args = ModelArgs.from_file(Path(path) / "config.json")
    except (ConfigError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if lengths:
        figures["memory"] = long_runs.bench_memory(
            real_args, lengths, a.memory_chunk_size, a.memory_local_size, a.prefill_step_size
        )
    if a.json is not None:
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps(figures, indent=1))
        tmp.replace(a.json)  # never a half-written file
    return 0


def _lengths(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        return int_list(text, flag, minimum=2)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
