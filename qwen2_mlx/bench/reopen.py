"""Benchmark: the next turn of a long chat reopened after a restart, cold against its cache from disk.

    python -m qwen2_mlx.bench.reopen --model PATH [--tokens 8192] [--runs 3] [--dtype float32]

A chat of about `--tokens` tokens (a pasted document, a question, a reply) is prefilled once and its
KV cache saved with `CacheStore`, as the chat app does when a reply ends. Then, alternating:
  cold      a fresh Chat over the same messages: the whole history is prefilled for the next turn;
  reopened  the cache is loaded from disk (whole and valid, checked), adopted by a fresh Chat, and only
            the new message is prefilled.
Time to first token is wall time from nothing in memory (load included) to the first token; both
greedy first tokens are compared. Prints each run, the medians and their ratio (goal: at most 10%),
and the save's time, size and extra peak memory.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "river mountain signal engine harbor lantern quiet measure copper window garden theory "
    "market winter silver promise shadow ladder circuit meadow thunder pocket compass marble "
    "village rhythm canvas orbit anchor velvet kernel cipher beacon glacier ember tunnel"
).split()
QUESTION = "In two sentences, what is the third paragraph of the document about?"


def document(tokenizer, target: int, seed: int = 0) -> str:
    """Paragraphs of seeded random sentences, about `target` tokens long."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    n = 0
    while n < target:
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
            for _ in range(rng.randint(4, 8))
        ]
        paragraphs.append(f"{len(paragraphs) + 1}. " + " ".join(sentences))
        n = len(tokenizer.encode("\n\n".join(paragraphs)))
    return "\n\n".join(paragraphs)


def _parser(default_model) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.reopen", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(default_model), help="model folder (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=8192, help="length of the chat in tokens (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs of each kind, alternating (default: %(default)s)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="cast the weights (default: float32, the fast type on a CPU)",
    )
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None, help="quantize the KV cache")
    p.add_argument("--cache-dir", default=None, help="where the cache is saved (default: a temporary folder)")
    return p


def _report(n_tokens: int, saved, save_peak: int, load_s: float, runs: dict) -> bool:
    """Print the figures; returns whether both kinds of run gave the same first token."""
    cold_s = statistics.median(s for s, _ in runs["cold"])
    warm_s = statistics.median(s for s, _ in runs["reopened"])
    same = {t for _, t in runs["cold"]} == {t for _, t in runs["reopened"]} and len({t for _, t in runs["cold"]}) == 1
    ratio = warm_s / cold_s
    print(f"chat tokens:            {n_tokens:,}")
    print(
        f"save:                   {saved.seconds:.2f}s, {saved.nbytes / 1e6:.1f} MB on disk, "
        f"{save_peak / 1e6:.1f} MB extra peak memory"
    )
    print(f"load from disk:         {load_s:.3f}s (median)")
    print(f"TTFT cold (median):     {cold_s:.3f}s")
    print(f"TTFT reopened (median): {warm_s:.3f}s (load included)")
    print(f"reopened / cold:        {ratio:.1%} ({'meets' if ratio <= 0.10 else 'misses'} the 10% goal)")
    print(f"same first token:       {'yes' if same else 'NO'}")
    return same


def _alternate(n: int, kinds: dict) -> dict[str, list]:
    """Run each kind `n` times, alternating; (seconds, first token) per run and kind."""
    runs: dict[str, list] = {name: [] for name in kinds}
    for i in range(n):
        for name, fn in kinds.items():
            seconds, token, prefilled = fn()
            runs[name].append((seconds, token))
            print(f"run {i + 1} {name:>8}: TTFT {seconds:7.3f}s  prefilled {prefilled:,} tokens", flush=True)
    return runs


def main(argv=None) -> int:
    from qwen2_mlx.loading.paths import default_model_path

    p = _parser(default_model_path())
    args = p.parse_args(argv)
    if args.tokens < 64 or args.runs < 1:
        p.error("--tokens must be at least 64 and --runs at least 1")
    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)  # Linux CPU: re-run with OpenBLAS preloaded (qwen2_mlx/blas.py)

    import mlx.core as mx

    from qwen2_mlx import load
    from qwen2_mlx.generation.cache_store import CacheStore, chat_cache_validity
    from qwen2_mlx.generation.chat import Chat
    from qwen2_mlx.generation.generate import prefill_prompt_cache
    from qwen2_mlx.generation.prompt_cache import make_prompt_cache
    from qwen2_mlx.generation.settings import GenerationSettings

    model, tokenizer = load(args.model, dtype=getattr(mx, args.dtype))
    mx.eval(model.parameters())
    kv = {"kv_bits": args.kv_bits} if args.kv_bits else {}
    history = [
        {"role": "user", "content": "Here is a document:\n\n" + document(tokenizer, args.tokens - 120)},
        {"role": "assistant", "content": "I have read the document. What would you like to know about it?"},
    ]

    def fresh() -> Chat:
        return Chat(model, tokenizer, messages=history, settings=GenerationSettings(max_tokens=1, **kv))

    # The state the chat app has after the reply: the history's tokens in the cache, saved on disk.
    chat = fresh()
    ids = chat._tokens(chat.messages, False)
    print(f"chat: {len(ids):,} tokens; model {args.model} ({args.dtype})", file=sys.stderr)
    cache = make_prompt_cache(model)
    tic = time.perf_counter()
    prefill_prompt_cache(model, tokenizer, ids, cache, **kv)
    mx.eval([c.state for c in cache])
    print(f"first prefill (not timed as a run): {time.perf_counter() - tic:.1f}s", file=sys.stderr)
    chat.adopt_cache(cache, ids)
    with tempfile.TemporaryDirectory() as tmp:
        store = CacheStore(Path(args.cache_dir or tmp))
        validity = chat_cache_validity(chat, args.model)
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        saved = store.save("bench", *chat.export_cache(), validity, model)
        save_peak = mx.get_peak_memory() - before
        del chat, cache
        if not saved.written:
            print(f"error: the cache was not saved: {saved.reason}", file=sys.stderr)
            return 1

        def cold() -> tuple[float, int, int]:
            tic = time.perf_counter()
            c = fresh()
            r = next(iter(c.stream(QUESTION)))
            return time.perf_counter() - tic, r.token, r.prompt_tokens

        def reopened() -> tuple[float, int, int]:
            tic = time.perf_counter()
            c = fresh()
            loaded = store.load("bench", chat_cache_validity(c, args.model), model)
            if not loaded.ok:
                raise RuntimeError(f"the saved cache was ignored: {loaded.reason}")
            c.adopt_cache(loaded.cache, loaded.tokens)
            r = next(iter(c.stream(QUESTION)))
            return time.perf_counter() - tic, r.token, r.prompt_tokens

        runs = _alternate(args.runs, {"cold": cold, "reopened": reopened})
        load_s = statistics.median(
            [store.load("bench", validity, model).seconds for _ in range(args.runs)]
        )  # the load alone, for the record

    same = _report(len(ids), saved, save_peak, load_s, runs)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
