"""`qwen2-serve`: the command line. Arguments are parsed and checked before MLX is imported.

qwen2-serve --model PATH [--host 127.0.0.1] [--port 8080] [--api-key KEY | $QWEN2_SERVE_API_KEY] [--allow-no-key]
            [--max-body-bytes 4MB]
            [--max-concurrency 8] [--queue-size 32] [--prompt-cache-size 10] [--prompt-cache-bytes 4GB]
            [--dca-chunk-size N ...] [--yarn-factor F ...] [--lookup | --draft-model PATH]
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

from qwen2_mlx.arguments import (
    DTYPE_NAMES,
    add_kv_cache_args,
    add_long_context_args,
    kv_cache_settings,
    long_context_overrides,
)
from qwen2_mlx.loading.paths import default_model_path

PROG = "qwen2-serve"


def _size(text: str) -> int:
    """'4GB', '512MB', '1e9' -> bytes."""
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 4GB or 512MB, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return int(value)


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {v}")
        return v

    return parse


_positive, _non_negative = _count(1), _count(0)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def port_in_use(host: str, port: int) -> Optional[str]:
    """Why `host:port` cannot be listened on (uvicorn binds with SO_REUSEADDR too), or None."""
    import socket

    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"unknown host ({e.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            return "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
    return None


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("under mlx.launch (docs/several-macs.md)")
    g.add_argument(
        "--parallel",
        choices=("tensor", "pipeline"),
        default="tensor",
        help="split every layer over the ranks (tensor, the default) or give each rank a slice of the layers "
        "(pipeline: one transfer per rank boundary, for Ethernet links)",
    )
    g.add_argument(
        "--rank-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="end the job when the engine makes no progress this long, waiting on the other ranks (default 600)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve a Qwen2 model over OpenAI's and Anthropic's HTTP APIs "
        "(/v1/chat/completions, /v1/completions, /v1/messages, /v1/models, /health).",
    )
    p.add_argument("--model", default=str(default_model_path()), help="model folder (default: %(default)s)")
    p.add_argument("--model-name", default=None, help="the id clients use (default: the folder's name)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="cast the weights (float32 is fast on a CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("QWEN2_SERVE_API_KEY"),
        help="require this bearer token on every route but /health (default: $QWEN2_SERVE_API_KEY, else none; "
        "prefer the variable: a command line is visible to every local user in `ps`)",
    )
    p.add_argument(
        "--allow-no-key",
        action="store_true",
        help="serve on an address beyond this machine (--host other than loopback) without an API key",
    )
    p.add_argument(
        "--max-body-bytes",
        type=_size,
        default=4 << 20,
        help="largest request body accepted; larger ones get 413 (default 4MB)",
    )
    g = p.add_argument_group("scheduling and caches")
    g.add_argument("--max-concurrency", type=_positive, default=8, help="requests decoded together (default 8)")
    g.add_argument(
        "--queue-size", type=_non_negative, default=32, help="requests waiting beyond those; more get 429 (default 32)"
    )
    g.add_argument(
        "--max-tokens", type=_positive, default=None, help="default completion limit (default: the context window)"
    )
    g.add_argument(
        "--prompt-cache-size", type=_positive, default=10, help="conversations kept in the prefix cache (default 10)"
    )
    g.add_argument("--prompt-cache-bytes", type=_size, default=4 << 30, help="prefix cache size in bytes (default 4GB)")
    g.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="keep long prompts' KV caches here so they survive a restart "
        "(default: $XDG_DATA_HOME/qwen2-mlx/serve-cache)",
    )
    g.add_argument("--no-cache-dir", action="store_true", help="keep the prefix cache in memory only")
    g.add_argument(
        "--cache-dir-bytes", type=_size, default=4 << 30, help="disk kept for the prefix cache (default 4GB)"
    )
    g.add_argument(
        "--prefill-step-size", type=_positive, default=2048, help="prompt tokens per prefill step (default 2048)"
    )
    g.add_argument(
        "--chat",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a chat saved with its KV cache (Chat.save(..., include_cache=True)): its conversation starts warm",
    )
    s = p.add_argument_group("speculative decoding (requests then run one at a time)")
    s.add_argument("--lookup", action="store_true", help="prompt-lookup speculative decoding (exact)")
    s.add_argument(
        "--draft-model", type=Path, default=None, metavar="PATH", help="a draft model with the same tokenizer"
    )
    s.add_argument(
        "--num-draft-tokens", type=_positive, default=3, help="tokens the draft proposes per step (default 3)"
    )
    add_long_context_args(p)
    add_kv_cache_args(p)
    _add_launch_args(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = long_context_overrides(args, parser)
    if args.lookup and args.draft_model is not None:
        parser.error("choose --lookup or --draft-model, not both")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    exposed = not is_loopback(args.host)
    if exposed and not args.api_key and not args.allow_no_key:
        parser.error(
            f"--host {args.host} serves beyond this machine without an API key: set QWEN2_SERVE_API_KEY "
            "(or --api-key), or pass --allow-no-key to serve it open"
        )
    args.warnings = []
    if exposed and not args.api_key:
        args.warnings.append(f"serving on {args.host} without an API key (--allow-no-key)")
    if any(a == "--api-key" or a.startswith("--api-key=") for a in (sys.argv[1:] if argv is None else argv)):
        args.warnings.append("--api-key is visible to local users in `ps`; prefer QWEN2_SERVE_API_KEY")
    from qwen2_mlx.runtime.packages import MissingPackage, require

    try:
        for module in ("starlette", "uvicorn", "llguidance", "pydantic"):
            require(module, PROG)
    except MissingPackage as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for chat in args.chat:
        if not chat.is_file():
            print(f"{PROG}: error: --chat {chat}: no such file", file=sys.stderr)
            return 2
    for label, path in (("--model", args.model), ("--draft-model", args.draft_model)):
        if path is not None and not (Path(path).expanduser() / "config.json").is_file():
            where = "no such folder" if not Path(path).expanduser().exists() else "no config.json there"
            default = label == "--model" and path == str(default_model_path())
            advice = " (run `python convert.py` to create the default model)" if default else ""
            print(f"{PROG}: error: {label} {path}: {where}{advice}", file=sys.stderr)
            return 2
    # Under mlx.launch only rank 0 listens (MLX_RANK is set by the launcher before MLX starts).
    busy = port_in_use(args.host, args.port) if os.environ.get("MLX_RANK", "0") == "0" else None
    if busy:  # before loading: a big model takes minutes to load only to fail here
        where = f"{args.host}:{args.port}"
        print(f"{PROG}: error: cannot listen on {where}: {busy}; choose another --port", file=sys.stderr)
        return 2

    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)  # Linux CPU: re-run with OpenBLAS preloaded
    return serve(args, overrides)


def _disk_cache(args: argparse.Namespace, model):
    """The prefix cache on disk (serve/disk_cache.py), or None with --no-cache-dir or an unusable folder."""
    if args.no_cache_dir:
        return None
    from qwen2_mlx.generation.cache_store import cache_validity

    from .disk_cache import DiskPrefixCache, default_dir

    kv = kv_cache_settings(args)
    validity = cache_validity(model, args.model, kv["kv_bits"], kv["kv_group_size"], kv["quantized_kv_start"])
    root = args.cache_dir or default_dir()
    try:
        return DiskPrefixCache(root, validity, model, args.cache_dir_bytes)
    except OSError as e:  # an unwritable folder costs the disk cache, never the server
        print(f"{PROG}: warning: --cache-dir {root}: {e}; the prefix cache stays in memory", file=sys.stderr)
        return None


def _refused_across_ranks(args: argparse.Namespace) -> Optional[str]:
    """Why these switches cannot run under mlx.launch, or None."""
    kv = kv_cache_settings(args)
    given = [
        name
        for name, on in (
            ("--lookup", args.lookup),
            ("--draft-model", args.draft_model is not None),
            ("--kv-bits", kv["kv_bits"] is not None),
            ("--chat", bool(args.chat)),
        )
        if on
    ]
    if not given:
        return None
    return (
        f"{', '.join(given)}: not available under mlx.launch (the ranks run one continuous batch, "
        "with a float KV cache, from a cold prefix cache)"
    )


def _load(args: argparse.Namespace, overrides: dict, group):
    """(model, tokenizer, draft model or None); under mlx.launch each rank loads its shard."""
    from qwen2_mlx.arguments import mlx_dtype
    from qwen2_mlx.loading.loader import load

    dtype = mlx_dtype(args.dtype)
    if group.size() > 1:
        from qwen2_mlx.loading.sharded import sharded_load

        return (*sharded_load(args.model, group, dtype=dtype, parallel=args.parallel, **overrides), None)
    model, tokenizer = load(args.model, dtype=dtype, **overrides)
    draft = load(args.draft_model, dtype=dtype)[0] if args.draft_model else None
    return model, tokenizer, draft


def _engine(args: argparse.Namespace, model, tokenizer, draft, group):
    """The single-process engine, or under mlx.launch the one whose steps rank 0 plans for every rank."""
    from .engine import Engine

    common = dict(
        model_name=args.model_name or Path(args.model).resolve().name,
        max_concurrency=args.max_concurrency,
        queue_size=args.queue_size,
        cache_entries=args.prompt_cache_size,
        cache_bytes=args.prompt_cache_bytes,
        prefill_step_size=args.prefill_step_size,
        default_max_tokens=args.max_tokens,
    )
    if group.size() > 1:
        from .distributed_engine import DistributedEngine

        return DistributedEngine(model, tokenizer, group=group, rank_timeout=args.rank_timeout, **common)
    return Engine(
        model,
        tokenizer,
        lookup=True if args.lookup else None,
        draft_model=draft,
        num_draft_tokens=args.num_draft_tokens,
        kv=kv_cache_settings(args),
        disk_cache=_disk_cache(args, model),
        **common,
    )


def _preload(args: argparse.Namespace, engine, model, tokenizer) -> bool:
    """Warm the prefix cache from every --chat file; False (after one line) on a file that cannot load."""
    from qwen2_mlx.generation.chat import Chat, ChatFileError
    from qwen2_mlx.generation.prompt_cache import CacheIgnored, PromptCacheError

    for path in args.chat:  # before the engine thread starts: nothing else touches the cache yet
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CacheIgnored)
                chat = Chat.load(path, model, tokenizer)
        except (ChatFileError, PromptCacheError, ValueError) as e:
            print(f"{PROG}: error: --chat {path}: {e}", file=sys.stderr)
            return False
        ignored = [w.message.error for w in caught if isinstance(w.message, CacheIgnored)]
        for e in ignored:  # damaged, or made for other settings (e.g. plain attention, before DCA was the default)
            print(f"{PROG}: warning: --chat {path}: {e}; the conversation starts cold", file=sys.stderr)
        if ignored:
            continue
        if not engine.preload(chat._cache_tokens, chat._cache):
            print(f"{PROG}: warning: --chat {path}: saved without its KV cache; nothing to preload", file=sys.stderr)
    return True


def serve(args: argparse.Namespace, overrides: dict) -> int:
    import logging

    import mlx.core as mx

    from qwen2_mlx.loading.loader import ModelLoadError
    from qwen2_mlx.models.config import ConfigError
    from qwen2_mlx.models.sharding import ShardingError

    group = mx.distributed.init()  # size 1 unless started by mlx.launch
    lead = group.rank() == 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for line in getattr(args, "warnings", []) if lead else []:  # after the OpenBLAS re-run, so said once
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    if group.size() == 1 and args.parallel != "tensor":
        print(f"{PROG}: warning: --parallel applies under mlx.launch only; serving in one process", file=sys.stderr)
    refused = _refused_across_ranks(args) if group.size() > 1 else None
    try:
        if refused:
            raise ValueError(refused)
        model, tokenizer, draft = _load(args, overrides, group)
        engine = _engine(args, model, tokenizer, draft, group)
    except (ModelLoadError, ConfigError, ShardingError, OSError, ValueError) as e:
        if lead:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if not lead:
        return _follow(engine)
    if not _preload(args, engine, model, tokenizer):
        return 2
    return _listen(args, engine, distributed=group.size() > 1)


def _follow(engine) -> int:
    """A rank other than 0: no clients, only rank 0's plans; Ctrl-C is rank 0's to handle (it stops us)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine.follow()  # ends the process when rank 0 says stop
    return 0


def _listen(args: argparse.Namespace, engine, distributed: bool) -> int:
    """Serve HTTP until stopped; under mlx.launch, stopping also stops every rank, or says it could not."""
    import signal

    import uvicorn

    from .app import create_app

    if distributed:  # uvicorn raises the signal it stopped on again: let it return here instead
        signal.signal(signal.SIGTERM, lambda *_: None)
    engine.start()
    app = create_app(engine, api_key=args.api_key, model_path=str(args.model), max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run()
    finally:
        if not distributed:
            engine.close()
    if distributed:
        from .distributed_engine import RanksLost, fatal

        try:
            engine.close()
        except RanksLost as e:
            fatal(str(e))
    return 0
