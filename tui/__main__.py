"""`qwen2-chat`: the terminal chat app, or one reply for `--prompt "…"` / text piped on stdin."""

from __future__ import annotations

import argparse
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Optional, TextIO

from qwen2_mlx.arguments import add_long_context_args, kv_bits_arg, long_context_overrides, memory_budget_arg
from qwen2_mlx.loading.paths import default_model_path
from qwen2_mlx.runtime.blas import ensure_openblas

from .model_folders import check_model

HINT = "hint: run `python convert.py` to create the default model, or pass --model PATH"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwen2-chat",
        description="Chat with a Qwen2 model in the terminal (MLX in-process, or on a server with --server URL). "
        "With --prompt or piped stdin, print one reply and exit.",
    )
    p.add_argument("--model", type=Path, default=None, help=f"converted model folder (default: {default_model_path()})")
    p.add_argument("--prompt", "-p", default=None, help="print one reply to this prompt on stdout and exit")
    p.add_argument("--system", "-s", default=None, help="system prompt for new chats")
    p.add_argument(
        "--file",
        "-f",
        action="append",
        default=[],
        metavar="PATH",
        help="attach a file, folder or PDF to the first message (repeatable; /file in the app)",
    )
    p.add_argument("--temp", type=float, default=None, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling, 0 = off (default 20)")
    p.add_argument("--max-tokens", type=int, default=None, help="longest reply in tokens (default 1024)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable replies")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="cast the weights (float32 is the fast choice on a CPU)",
    )
    p.add_argument(
        "--lookup", action="store_true", help="prompt-lookup speculative decoding (exact; /set lookup on|off)"
    )
    p.add_argument(
        "--draft-model", type=Path, default=None, metavar="PATH", help="a draft model with the same tokenizer"
    )
    p.add_argument(
        "--num-draft-tokens", type=int, default=3, metavar="N", help="tokens the draft proposes per step (default 3)"
    )
    p.add_argument(
        "--kv-bits",
        type=kv_bits_arg,
        default=None,
        metavar="{4,8,auto}",
        help="quantize the KV cache to 4 or 8 bits in new chats: longer chats in less memory (/set kv-bits); "
        "auto: 8 bits once the float cache would pass --memory-budget",
    )
    p.add_argument(
        "--memory-budget",
        type=memory_budget_arg,
        default=None,
        metavar="SIZE",
        help="for --kv-bits auto, e.g. 4GB (default: the device's recommended working set, else 3/4 of RAM)",
    )
    p.add_argument("--inline", "-i", action="store_true", help="run under the prompt instead of full screen")
    p.add_argument("--chat", type=int, default=None, metavar="ID", help="reopen a saved chat by id")
    p.add_argument("--last", action="store_true", help="reopen the most recent chat")
    p.add_argument("--db", type=Path, default=None, help="chat database (default: in the qwen2-mlx data folder)")
    p.add_argument(
        "--server",
        metavar="URL",
        default=None,
        help="chat with a model on an OpenAI-compatible server (qwen2-serve, local or remote) instead of loading one",
    )
    p.add_argument(
        "--api-key", default=None, help="the server's API key (default $QWEN2_CHAT_API_KEY, which stays out of `ps`)"
    )
    p.add_argument("--model-id", default=None, help="which of the server's models (default: the first it lists)")
    add_long_context_args(p)
    return p


def settings_from(args: argparse.Namespace) -> dict:
    pairs = {
        "temperature": args.temp,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "lookup": True if args.lookup else None,
        "kv_bits": args.kv_bits,
        "memory_budget": args.memory_budget,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def run_once(
    backend,
    text: str,
    system: Optional[str],
    settings: dict,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
) -> int:
    """Load, answer `text` once on `out` (progress and notes on `err`); returns the exit status."""
    from .backend import DEFAULT_SETTINGS

    out = out or sys.stdout
    err = err or sys.stderr

    live = hasattr(err, "isatty") and err.isatty()

    def progress(fraction: float, what: str) -> None:
        if live:  # one line redrawn in place; a log file gets only the first and last step
            err.write(f"\rloading model {fraction:4.0%} {what[:60]:<60}")
        elif fraction in (0.0, 1.0):
            err.write(f"loading model {fraction:4.0%} {what}\n")
        err.flush()

    try:
        backend.load(progress)
    except Exception as e:
        err.write(f"\nqwen2-chat: cannot load the model: {e}\n{HINT}\n")
        return 2
    if live:
        err.write("\n")
    cancel = threading.Event()
    reason = None
    try:
        for r in backend.generate(
            [{"role": "user", "content": text}], system, {**DEFAULT_SETTINGS, **settings}, cancel
        ):
            if r.text:
                out.write(r.text)
                out.flush()
            reason = r.finish_reason or reason
    except KeyboardInterrupt:
        out.write("\n")
        err.write("[stopped]\n")
        return 130
    except Exception as e:
        err.write(f"\nqwen2-chat: generation failed: {e}\n")
        return 1
    out.write("\n")
    if reason == "length":
        err.write("[reply cut at --max-tokens]\n")
    elif reason == "context":
        err.write("[reply cut: the context window is full]\n")
    return 0


def read_piped_stdin() -> Optional[str]:
    """Text piped into the command (`git diff | qwen2-chat -p "review"`), or None at a terminal."""
    stdin = sys.stdin
    try:
        if stdin is None or stdin.isatty():
            return None
        return stdin.read()
    except (OSError, ValueError):  # closed, or not readable here
        return None


def stdin_is_a_pipe() -> bool:
    """A pipe or a file, not /dev/null (cron and CI run with no input at all: that is no empty pipe)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def local_backend(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(the model folder's backend, a maker of others for /model), or the exit status of a bad folder."""
    model_path = args.model or default_model_path()
    problem = check_model(model_path)
    if problem:
        hint = f"\n{HINT}" if args.model is None and "convert.py" not in problem else ""
        print(f"qwen2-chat: error: {problem}{hint}", file=sys.stderr)
        return 2
    if args.draft_model is not None:
        problem = check_model(args.draft_model)
        if problem:
            print(f"qwen2-chat: error: --draft-model: {problem}", file=sys.stderr)
            return 2
    if args.num_draft_tokens < 1:
        print("qwen2-chat: error: --num-draft-tokens must be at least 1", file=sys.stderr)
        return 2
    from .backend import ModelBackend

    draft = {"draft_path": args.draft_model, "num_draft_tokens": args.num_draft_tokens}
    overrides = long_context_overrides(args, parser)
    backend = ModelBackend(model_path, dtype=args.dtype, overrides=overrides, **draft)
    return backend, lambda path: ModelBackend(path, dtype=args.dtype, overrides=backend.overrides, **draft)


# Switches that act on a model in this process: with --server they are the server's (qwen2-serve's) to set.
LOCAL_SWITCHES = ("model", "draft_model", "dtype", "lookup", "kv_bits", "memory_budget")


def server_backend(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(a connected RemoteBackend, None), or the exit status after one line: a bad URL, no server, a 401."""
    from .remote import API_KEY_ENV, RemoteBackend, ServerError

    local = [f"--{k.replace('_', '-')}" for k in LOCAL_SWITCHES if getattr(args, k)]
    local += [f"--{k.replace('_', '-')}" for k, v in long_context_overrides(args, parser).items() if v]
    if local:
        print(
            f"qwen2-chat: error: {', '.join(local)} acts on a local model; with --server, start the server "
            "with it (qwen2-serve takes the same switches)",
            file=sys.stderr,
        )
        return 2
    if args.api_key is not None:
        print(
            f"qwen2-chat: warning: --api-key shows in `ps` to every local user; prefer ${API_KEY_ENV}", file=sys.stderr
        )
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    try:
        backend = RemoteBackend(args.server, api_key=key, model_id=args.model_id)
        backend.load(lambda *_: None)  # here, so a server that is not there costs one line, not the app
    except (ValueError, ServerError) as e:
        print(f"qwen2-chat: error: {e}", file=sys.stderr)
        return 2
    return backend, None


def main(argv: Optional[list[str]] = None) -> int:
    ensure_openblas(argv)  # Linux CPU: re-run with OpenBLAS preloaded (qwen2_mlx/blas.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    piped = read_piped_stdin()
    if piped is not None and not piped.strip() and stdin_is_a_pipe():
        # `git diff | qwen2-chat -p "Review"` with nothing to review: say so rather than send the bare prompt
        print("qwen2-chat: error: nothing came on stdin (the pipe was empty); nothing was sent", file=sys.stderr)
        return 2
    one_shot = args.prompt is not None or piped is not None
    text = "\n\n".join(t for t in (args.prompt, piped) if t and t.strip())
    if one_shot and not text.strip():
        print("qwen2-chat: error: the prompt is empty", file=sys.stderr)
        return 2
    from qwen2_mlx.generation.attachments import AttachmentError, read_attachment, render_message

    try:
        attachments = [read_attachment(f) for f in args.file]
    except AttachmentError as e:
        print(f"qwen2-chat: error: --file {e}", file=sys.stderr)
        return 2
    made = server_backend(args, parser) if args.server is not None else local_backend(args, parser)
    if isinstance(made, int):
        return made
    backend, factory = made
    settings = settings_from(args)
    if one_shot:
        return run_once(backend, render_message(attachments, text), args.system, settings)

    from .app import ChatApp
    from .store import Store

    try:
        store = Store(args.db)
    except Exception as e:  # sqlite3.Error or a folder we may not write
        print(f"qwen2-chat: error: cannot open the chat database {args.db or ''}: {e}", file=sys.stderr)
        return 2
    chat_id = args.chat
    if args.last and chat_id is None:
        chats = store.chats()
        chat_id = chats[0].id if chats else None
    app = ChatApp(
        backend,
        store,
        chat_id=chat_id,
        default_system=args.system,
        default_settings=settings,
        backend_factory=factory,
        attachments=attachments,
    )
    code = app.run(inline=args.inline)
    store.close()
    code = code if isinstance(code, int) else (app.return_code or 0)
    _leave_if_still_reading(app, code)
    return code


def _leave_if_still_reading(app, code: int) -> None:
    """Quitting during a long prefill step leaves the generation thread inside MLX (it stops at the step's
    end, minutes away at 36K tokens on a CPU); the interpreter's exit would then abort the process. The
    chat database is closed and the last checkpoint is whole on disk, so leave at once instead."""
    engine = getattr(app, "engine", None)
    if engine is not None and engine.busy:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
