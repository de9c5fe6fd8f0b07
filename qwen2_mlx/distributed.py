"""Generate with a Qwen2 model split over the ranks of `mlx.launch` (tensor or pipeline parallel, `mx.distributed`).

The splitting itself is the model's (`models/sharding.py` and `models/pipeline.py`, `Model.shard`); the
loading that reads only each rank's part is `loading/sharded.py`. Run it on one machine or several
(see docs/several-macs.md):

    mlx.launch -n 2 --backend ring -- python -m qwen2_mlx.distributed --model PATH --prompt "hi"
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path
from typing import Optional

from qwen2_mlx.arguments import DTYPE_NAMES, add_long_context_args, long_context_overrides, mlx_dtype


def peak_rss_gb() -> float:
    """This process's peak resident memory in GB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qwen2_mlx.distributed",
        description="Generate with a Qwen2 model split over the ranks of `mlx.launch` (tensor or pipeline parallel). "
        "Every rank runs this same command; rank 0 prints.",
        epilog="example: mlx.launch -n 2 --backend ring -- python -m qwen2_mlx.distributed --model PATH --prompt hi",
    )
    p.add_argument("--model", help="model folder (default: the folder `python convert.py` writes)")
    p.add_argument("--prompt", help="the user message")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="send --prompt as is, without the chat template")
    p.add_argument(
        "--interactive",
        action="store_true",
        help="line-based chat: each line of stdin is a user turn (mlx.launch forwards stdin to every rank)",
    )
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed; the same on every rank")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="cast floating weights (float32 is fastest on a CPU)")
    p.add_argument(
        "--parallel",
        choices=("tensor", "pipeline"),
        default="tensor",
        help="tensor: every rank holds 1/N of every layer (two all_sums per layer per token, for fast links); "
        "pipeline: every rank holds a contiguous slice of the layers (one send per rank boundary, for slow links)",
    )
    p.add_argument("--backend", default="any", help="mx.distributed backend (default: whatever mlx.launch set up)")
    p.add_argument("--verbose", action="store_true", help="print speed and per-rank memory on stderr")
    return add_long_context_args(p)


def _prompt_tokens(tokenizer, messages: list, raw: bool) -> list[int]:
    if raw:
        return tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _arguments(argv: Optional[list]) -> tuple[argparse.Namespace, dict]:
    """The parsed arguments, checked together (an error exits with status 2), and the long-context overrides."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.interactive == (args.prompt is not None):
        parser.error("give either --prompt or --interactive")
    if args.raw and args.interactive:
        parser.error("--raw applies to --prompt only (the interactive chat uses the chat template)")
    if args.max_tokens <= 0:
        parser.error("--max-tokens must be positive")
    return args, long_context_overrides(args, parser)


def main(argv: Optional[list] = None) -> int:
    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)  # Linux CPU: re-run with OpenBLAS preloaded (runtime/blas.py), before MLX is imported
    args, overrides = _arguments(argv)
    import mlx.core as mx

    from qwen2_mlx.generation.chat import Chat
    from qwen2_mlx.generation.generate import stream_generate
    from qwen2_mlx.generation.settings import GenerationSettings
    from qwen2_mlx.loading.loader import ModelLoadError
    from qwen2_mlx.loading.paths import default_model_path
    from qwen2_mlx.loading.sharded import sharded_load
    from qwen2_mlx.loading.tokenizer import TokenizerError
    from qwen2_mlx.models.config import ConfigError
    from qwen2_mlx.models.sharding import ShardingError

    group = mx.distributed.init(backend=args.backend)
    rank, size = group.rank(), group.size()
    lead = rank == 0

    def say(msg: str):
        if lead:
            print(msg, file=sys.stderr, flush=True)

    path = Path(args.model).expanduser() if args.model else default_model_path()
    say(f"[rank 0/{size}] loading {path}")
    try:
        model, tokenizer = sharded_load(path, group, dtype=mlx_dtype(args.dtype), parallel=args.parallel, **overrides)
    except (ShardingError, ConfigError, ModelLoadError, TokenizerError) as e:
        say(f"error: {e}")
        return 2
    if args.verbose:
        print(
            f"[rank {rank}/{size}] loaded: peak memory {mx.get_peak_memory() / 1e9:.2f} GB (MLX), "
            f"{peak_rss_gb():.2f} GB (RSS)",
            file=sys.stderr,
            flush=True,
        )

    def show(responses) -> None:
        last = None
        for last in responses:
            if lead:
                print(last.text, end="", flush=True)
        if lead:
            print(flush=True)
            if args.verbose and last is not None:
                say(
                    f"[{last.finish_reason}] prompt {last.prompt_tokens} tok at {last.prompt_tps:.1f} tok/s, "
                    f"generation {last.generation_tokens} tok at {last.generation_tps:.1f} tok/s over {size} ranks"
                )

    settings = GenerationSettings(temperature=args.temp, top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens)
    if not args.interactive:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        try:
            show(stream_generate(model, tokenizer, _prompt_tokens(tokenizer, messages, args.raw), settings=settings))
        except ValueError as e:  # the prompt does not fit the context window
            say(f"error: {e}")
            return 2
        return 0
    # Every rank reads the same stdin (mlx.launch forwards it to all), so every rank's Chat sees the
    # same turns, reuses the same cached prefix and stays in step with the others.
    chat = Chat(model, tokenizer, system=args.system, context_policy="drop_oldest", settings=settings)
    say("[interactive] type a message per line; an empty line or end of input quits")
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            break
        try:
            show(chat.stream(line))
        except ValueError as e:  # a single message longer than the context window
            say(f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
