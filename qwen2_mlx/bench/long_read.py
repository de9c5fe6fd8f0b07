"""`python -m qwen2_mlx.bench.long_read`: a chat past the trained window, read cold, killed and resumed, reopened.

The document is the pass-key prompt of bench.beyond_window (`--tokens` long, the key at `--depth`), sent as
one chat message with the default settings: no long-context switch.
1. A reader process reads it, checkpointing its KV cache (generation/checkpoint.py), and is killed with
   SIGKILL once a checkpoint holds `--stop-at` of the prompt (`--interrupt quit`: sent SIGTERM instead, it
   stops at its next step and saves what it read, as the chat app does when quit).
2. Here, a chat adopts that checkpoint and sends the same message: it reads only what the checkpoint lacks.
   The chat's cache is saved to a `CacheStore`, as the chat app does after a reply.
3. "Restart": a fresh chat with the same history loads the cache from disk and asks a follow-up question;
   the time to its first token is what reopening the chat costs.
4. A cold process reads the whole message uninterrupted (`--cold alongside` runs it during 1-3, on the other
   core, at the price of both sharing the machine): its answer must equal the resumed one, token for token.
Prints and writes (`--json`) the answers, whether they hold the key, the times and the peak memory.
"""

from __future__ import annotations

import argparse
import json
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
from .resume import kill_mid_read

KEY = "long-read"
FOLLOW_UP = "Repeat the pass key, digits only."
MAX_TOKENS = 16
QUIT_WAIT = 3600.0  # seconds a quit reader may take to finish its step and save (a step at 36K: minutes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.long_read", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder (float32 is the fast type on a CPU)")
    p.add_argument("--tokens", type=int, default=36000, help="prompt tokens (default %(default)s)")
    p.add_argument("--depth", type=float, default=0.5, help="where the key sits, 0..1 (default %(default)s)")
    p.add_argument("--stop-at", type=float, default=0.5, help="share read when the reader is killed (default 0.5)")
    p.add_argument("--interrupt", choices=("kill", "quit"), default="kill", help="how the reader is stopped")
    p.add_argument("--every-seconds", type=float, default=20.0, help="checkpoint interval (default 20)")
    p.add_argument("--prefill-step-size", type=int, default=2048, help="tokens a prefill step (default 2048)")
    p.add_argument("--cold", choices=("after", "alongside", "skip"), default="after", help="the uninterrupted read")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--role", choices=("reader", "cold"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


def _prompt(args):
    from qwen2_mlx.eval.prompts import passkey_prompt, random_key
    from qwen2_mlx.loading.tokenizer import load_tokenizer

    return passkey_prompt(load_tokenizer(Path(args.model)), args.tokens, args.depth, random_key(0, 0), "")


def _chat(model_path: str, lazy: bool = False):
    from qwen2_mlx import Chat, load

    model, tokenizer = load(model_path, lazy=lazy)  # the defaults: long context on, no switch
    return Chat(model, tokenizer, temperature=0.0, max_tokens=MAX_TOKENS)


def _timed_send(chat, text: str, **kw) -> dict:
    """Send `text`; the reply, seconds to its first token and in all, and the peak MLX memory."""
    import mlx.core as mx

    mx.reset_peak_memory()
    tic, first, parts, read = time.perf_counter(), None, [], 0
    for r in chat.stream(text, **kw):
        first = first or time.perf_counter() - tic
        parts.append(r.text)
        read = r.prompt_tokens  # the tokens this turn read (what a cache held is not read again)
    seconds, peak = round(time.perf_counter() - tic, 1), round(mx.get_peak_memory() / 1e9, 3)
    return {"reply": "".join(parts), "prompt_tokens_read": read, "ttft_s": round(first or 0.0, 2), "seconds": seconds,
            "peak_gb": peak}  # fmt: skip


def _role(args) -> None:
    """A child process: the reader (killed mid-read) or the cold read (writes its figures to --out)."""
    from qwen2_mlx.generation.cache_store import CacheStore, chat_cache_validity
    from qwen2_mlx.generation.checkpoint import Checkpointer

    text, chat = _prompt(args).user, _chat(args.model)
    if args.role == "cold":
        out = _timed_send(chat, text, prefill_step_size=args.prefill_step_size)
        Path(args.out).write_text(json.dumps(out))
        return
    store = CacheStore(args.out)
    validity = chat_cache_validity(chat, args.model)
    point = Checkpointer(store, KEY, validity, chat.model, every_seconds=args.every_seconds)
    quit_ = threading.Event()
    if args.interrupt == "quit":  # a quit: stop at the next step, then save what was read
        signal.signal(signal.SIGTERM, lambda *_: quit_.set())
    chat.send(text, checkpoint=point, cancel=quit_, prefill_step_size=args.prefill_step_size)
    if quit_.is_set():
        store.save(KEY, *chat.export_cache(), validity, chat.model)
        return
    time.sleep(3600)  # the parent kills it before this, mid-read


def _command(args, role: str, out: str) -> list:
    cmd = [sys.executable, "-m", "qwen2_mlx.bench.long_read", "--model", args.model, "--tokens", str(args.tokens)]
    cmd += ["--depth", str(args.depth), "--every-seconds", str(args.every_seconds), "--interrupt", args.interrupt]
    return cmd + ["--prefill-step-size", str(args.prefill_step_size), "--role", role, "--out", out]


def _kill_mid_read(args, store_dir: str, total: int, out: dict) -> int:
    """Run the reader until a checkpoint holds `stop_at` of the prompt, stop it; the tokens saved."""
    tic = time.perf_counter()
    wait = QUIT_WAIT if args.interrupt == "quit" else None
    saved, status = kill_mid_read(_command(args, "reader", store_dir), store_dir, KEY, args.stop_at * total, wait)
    out["killed_after_s"], out["reader_exit"] = round(time.perf_counter() - tic, 1), status
    return saved


def _resume_and_reopen(args, text: str, out: dict) -> Optional[dict]:
    """Steps 1-3; the resumed reply's figures, or None (said on stderr) when the checkpoint was not usable."""
    from qwen2_mlx.generation.cache_store import CacheStore, chat_cache_validity

    chat = _chat(args.model, lazy=True)  # its weights are read after the reader is gone
    out["prompt_tokens"] = total = len(chat._tokens([{"role": "user", "content": text}], True))
    with tempfile.TemporaryDirectory(prefix="qwen2-long-read-") as store_dir:
        out["interrupt"] = args.interrupt
        out["checkpoint_tokens"] = _kill_mid_read(args, store_dir, total, out)
        store, validity = CacheStore(store_dir), chat_cache_validity(chat, args.model)
        loaded = store.load(KEY, validity, chat.model)
        if not loaded.ok:
            print(f"the checkpoint was not usable: {loaded.reason}", file=sys.stderr)
            return None
        chat.adopt_cache(loaded.cache, loaded.tokens)
        resumed = _timed_send(chat, text, cancel=threading.Event(), prefill_step_size=args.prefill_step_size)
        store.save("chat", *chat.export_cache(), validity, chat.model)
        history, model, tokenizer = chat.messages, chat.model, chat.tokenizer
        del chat, loaded
        from qwen2_mlx import Chat

        again = Chat(model, tokenizer, messages=history, temperature=0.0, max_tokens=MAX_TOKENS)
        tic = time.perf_counter()
        cached = store.load("chat", validity, model)
        if cached.ok:
            again.adopt_cache(cached.cache, cached.tokens)
        load_s = time.perf_counter() - tic
        reopened = _timed_send(again, FOLLOW_UP)
        reopened["ttft_s"] = round(load_s + reopened["ttft_s"], 2)  # from disk to the first token
        out["reopened"] = {**reopened, "cache_used": cached.ok, "load_s": round(load_s, 2)}
    return resumed


def main(argv: Optional[list] = None) -> int:
    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)
    p = _parser()
    args = p.parse_args(argv)
    if not 0 < args.stop_at < 1 or not 0 <= args.depth <= 1:
        p.error("--stop-at must be within 0..1 (exclusive) and --depth within 0..1")
    if args.role:
        _role(args)
        return 0
    from qwen2_mlx.eval.prompts import first_number

    prompt = _prompt(args)
    out: dict = {"model": args.model, "key": prompt.expected, "needle_token": prompt.needle_token}
    with tempfile.TemporaryDirectory(prefix="qwen2-long-read-cold-") as tmp:
        cold_file = os.path.join(tmp, "cold.json")
        cold_cmd = _command(args, "cold", cold_file)
        cold = subprocess.Popen(cold_cmd, env=dict(os.environ)) if args.cold == "alongside" else None
        resumed = _resume_and_reopen(args, prompt.user, out)
        if args.cold == "after":
            cold = subprocess.Popen(cold_cmd, env=dict(os.environ))
        if cold is not None:
            cold.wait()
            out["cold"] = json.loads(Path(cold_file).read_text()) if cold.returncode == 0 else None
    out["resumed"] = resumed
    for row in (out.get("cold"), resumed):
        if row:
            row["found"] = first_number(row["reply"]) == prompt.expected
    cold_row = out.get("cold")
    out["identical_reply"] = bool(resumed and cold_row and resumed["reply"] == cold_row["reply"])
    if cold_row and "reopened" in out:
        out["reopen_ttft_share_of_cold"] = round(out["reopened"]["ttft_s"] / cold_row["ttft_s"], 4)
    return report_identical(out, args.json)


if __name__ == "__main__":
    sys.exit(main())
