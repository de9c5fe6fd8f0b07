"""Benchmark: batch_generate against one-by-one generation on the same prompts.

    python -m qwen2_mlx.bench.batch --model PATH [--prompts 8] [--max-tokens 32] [--batch-size 8]

Both runs decode greedily with the end-of-turn token suppressed, so every prompt generates exactly
`--max-tokens` tokens and the work is the same; the token ids of both runs are compared. Prints decode
tokens/s, end-to-end wall time and the speed-up on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain recursion in one sentence.",
    "List three prime numbers.",
    "用一句话解释量子计算。",
    "What does HTTP stand for?",
    "Name a famous painting.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water?",
    "Give a synonym for 'happy'.",
    "Write a Python one-liner that sums a list.",
    "Who wrote Hamlet?",
    "What is 17 times 3?",
    "Describe the colour blue to someone who cannot see.",
    "Why is the sky blue?",
]


def main(argv=None) -> int:
    from qwen2_mlx.loading.paths import default_model_path

    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.batch", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(default_model_path()), help="model folder (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=8, help="number of prompts (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per prompt (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="batch_generate's batch size (default: %(default)s)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="cast the weights (float32 is the fast type on a CPU)",
    )
    args = p.parse_args(argv)
    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)  # Linux CPU: re-run with OpenBLAS preloaded (qwen2_mlx/blas.py)
    if args.prompts < 1 or args.max_tokens < 1 or args.batch_size < 1:
        p.error("--prompts, --max-tokens and --batch-size must be positive")

    import mlx.core as mx

    from qwen2_mlx import load
    from qwen2_mlx.generation.batch import batch_generate
    from qwen2_mlx.generation.generate import stream_generate
    from qwen2_mlx.generation.settings import GenerationSettings
    from qwen2_mlx.loading.loader import ModelLoadError

    try:
        model, tokenizer = load(args.model, dtype=getattr(mx, args.dtype) if args.dtype else None)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], add_generation_prompt=True, tokenize=False
        )
        for i in range(args.prompts)
    ]
    no_eos = {t: -1e9 for t in tokenizer.eos_token_ids}
    settings = GenerationSettings(logit_bias=no_eos)

    batch_generate(model, tokenizer, prompts[:1], max_tokens=2, settings=settings)  # warm-up (compile, allocate)

    print(f"one by one: {args.prompts} prompts x {args.max_tokens} tokens ...", file=sys.stderr)
    tic = time.perf_counter()
    single, decode_time = [], 0.0
    for prompt in prompts:
        rs = list(stream_generate(model, tokenizer, prompt, args.max_tokens, settings=settings))
        single.append([r.token for r in rs])
        if rs[-1].generation_tps > 0:
            decode_time += rs[-1].generation_tokens / rs[-1].generation_tps
    single_wall = time.perf_counter() - tic
    single_tokens = sum(len(t) for t in single)

    print(f"batched (batch size {args.batch_size}) ...", file=sys.stderr)
    tic = time.perf_counter()
    res = batch_generate(
        model, tokenizer, prompts, max_tokens=args.max_tokens, batch_size=args.batch_size, settings=settings
    )
    batch_wall = time.perf_counter() - tic

    single_tps = single_tokens / decode_time if decode_time else 0.0
    same = sum(a == b for a, b in zip(single, res.token_ids))
    print(
        f"model: {args.model}  device: {mx.default_device()}  prompts: {args.prompts}  "
        f"max_tokens: {args.max_tokens}  batch_size: {args.batch_size}"
    )
    print(f"one by one : decode {single_tps:8.1f} tok/s   wall {single_wall:7.2f} s")
    print(
        f"batched    : decode {res.stats.generation_tps:8.1f} tok/s   wall {batch_wall:7.2f} s   "
        f"(prefill {res.stats.prompt_tps:.1f} tok/s)"
    )
    print(
        f"speed-up   : decode x{res.stats.generation_tps / single_tps if single_tps else 0:.2f}   "
        f"wall x{single_wall / batch_wall if batch_wall else 0:.2f}"
    )
    print(f"identical token ids: {same}/{args.prompts} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
