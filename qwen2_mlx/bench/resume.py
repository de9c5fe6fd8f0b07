"""`python -m qwen2_mlx.bench.resume`: a long read killed half-way, then resumed from its checkpoint.

1. A child process reads a document of about `--tokens` tokens (the project's own source) as one
   chat message, checkpointing its KV cache to a `CacheStore` every `--every-seconds`
   (generation/checkpoint.py), and is killed with SIGKILL once a checkpoint holds `--stop-at` of it.
2. A fresh chat here adopts that checkpoint and sends the same message: it reads only what the
   checkpoint lacks. 3. Another fresh chat reads it all, uninterrupted.
Prints the tokens read the second time, both times, and whether the two answers are identical (greedy).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from .compare import report_identical
from .serve import conversation

QUESTION = "\n\nWhat does stream_generate return?"
KEY = "resume-bench"


def _chat(model_path: str, lazy: bool = False):
    from qwen2_mlx import Chat, load

    model, tokenizer = load(model_path, lazy=lazy)
    return Chat(model, tokenizer, temperature=0.0, max_tokens=24)


def _child(model_path: str, store_dir: str, tokens: int, every: float, step: int) -> None:
    from qwen2_mlx.generation.cache_store import CacheStore, chat_cache_validity
    from qwen2_mlx.generation.checkpoint import Checkpointer

    chat = _chat(model_path)
    store = CacheStore(store_dir)
    point = Checkpointer(store, KEY, chat_cache_validity(chat, model_path), chat.model, every_seconds=every)
    chat.send(conversation(tokens) + QUESTION, checkpoint=point, prefill_step_size=step)
    time.sleep(3600)  # the parent kills it before this, mid-read


def kill_mid_read(
    cmd: list, store_dir: str, key: str, target: float, quit_wait: Optional[float] = None
) -> tuple[int, int]:
    """Run `cmd`, a reader checkpointing under `key` in `store_dir`, until a checkpoint holds `target`
    tokens; kill -9 it; (the tokens its last checkpoint holds, its exit status: -9 when killed).

    `quit_wait`: send SIGTERM instead (the reader stops at its next step and saves what it read, as the
    chat app does at a quit) and wait this long for it to end, before a SIGKILL."""
    from qwen2_mlx.generation.cache_store import CacheStore

    child = subprocess.Popen(cmd, env=dict(os.environ))
    store, saved = CacheStore(store_dir), 0
    try:
        while child.poll() is None and saved < target:
            time.sleep(0.5)
            saved = _held(store, key)
    finally:
        ended = child.poll()
        if quit_wait is not None and ended is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(quit_wait)
            except subprocess.TimeoutExpired:
                print(f"the reader did not stop within {quit_wait:.0f}s of SIGTERM: killed", file=sys.stderr)
        child.send_signal(signal.SIGKILL)
        child.wait()
    if ended is not None:
        print(f"the reader ended by itself (exit status {ended}) before it was stopped", file=sys.stderr)
    return _held(store, key), child.returncode


def _held(store, key: str) -> int:
    head = store.peek(key)
    return len(head[1]) if head else 0


def _kill_mid_read(args, store_dir: str, total: int) -> int:
    cmd = [sys.executable, "-m", "qwen2_mlx.bench.resume", "--model", args.model, "--tokens", str(args.tokens)]
    cmd += ["--every-seconds", str(args.every_seconds), "--prefill-step-size", str(args.prefill_step_size)]
    return kill_mid_read(cmd + ["--child", store_dir], store_dir, KEY, args.stop_at * total)[0]


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.resume", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder (float32 is the fast type on a CPU)")
    p.add_argument("--tokens", type=int, default=3000, help="tokens in the document (default 3000)")
    p.add_argument("--stop-at", type=float, default=0.5, help="share read when the reader is killed (default 0.5)")
    p.add_argument("--every-seconds", type=float, default=10.0, help="checkpoint interval (default 10)")
    p.add_argument("--prefill-step-size", type=int, default=512, help="tokens a prefill step (default 512, the app's)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)  # Linux CPU: re-run with OpenBLAS preloaded (cli/blas.py)
    if args.child:
        _child(args.model, args.child, args.tokens, args.every_seconds, args.prefill_step_size)
        return 0
    from qwen2_mlx.generation.cache_store import CacheStore, chat_cache_validity

    content = conversation(args.tokens) + QUESTION
    with tempfile.TemporaryDirectory(prefix="qwen2-resume-") as store_dir:
        chat = _chat(args.model, lazy=True)  # its weights are read after the reader is gone: half the memory
        total = len(chat._tokens([{"role": "user", "content": content}], True))
        tic = time.perf_counter()
        saved = _kill_mid_read(args, store_dir, total)
        killed_after = time.perf_counter() - tic
        print(f"killed the reader after {killed_after:.1f}s; its checkpoint holds {saved:,} of {total:,} tokens")
        loaded = CacheStore(store_dir).load(KEY, chat_cache_validity(chat, args.model), chat.model)
        if not loaded.ok:
            print(f"the checkpoint was not usable: {loaded.reason}", file=sys.stderr)
            return 1
        chat.adopt_cache(loaded.cache, loaded.tokens)
        tic = time.perf_counter()
        resumed = chat.send(content, cancel=threading.Event(), prefill_step_size=args.prefill_step_size)
        resumed_s = time.perf_counter() - tic
    fresh = type(chat)(chat.model, chat.tokenizer, **chat.sampling)  # the same weights, no cache
    tic = time.perf_counter()
    whole = fresh.send(content, prefill_step_size=args.prefill_step_size)
    whole_s = time.perf_counter() - tic
    out = {
        "prompt_tokens": total,
        "checkpoint_tokens": saved,
        "tokens_read_after_resume": resumed.stats.prompt_tokens,
        "resumed_reply_s": round(resumed_s, 2),
        "uninterrupted_reply_s": round(whole_s, 2),
        "identical_reply": str(resumed) == str(whole),
    }
    return report_identical(out, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
