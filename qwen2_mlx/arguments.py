"""Long-context switches shared by the command-line tools (chat app, evaluation, benchmarks).

add_long_context_args(parser)
overrides = long_context_overrides(args, parser)   # {"dca": ..., "rope_scaling": ...}
model, tokenizer = load(path, **overrides)
"""

from __future__ import annotations

import argparse
from typing import Optional

from qwen2_mlx.models.config import ConfigError, _parse_rope_scaling, parse_dca

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # what --dtype takes in the tools


def mlx_dtype(name: Optional[str]):
    """The MLX dtype of a --dtype name (None stays None); imports MLX only when called."""
    if name is None or name == "auto":
        return None
    import mlx.core as mx

    return getattr(mx, name)


def int_list(text: str, name: str, minimum: int = 0, maximum: Optional[int] = None) -> list[int]:
    """'1024,2048' -> [1024, 2048]; a ValueError naming the option for anything else."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got '{text}'") from None
    if not values:
        raise ValueError(f"{name}: give at least one value")
    for v in values:
        if v < minimum or (maximum is not None and v > maximum):
            bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"{name}: {v} is out of range ({bound})")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: duplicate values in '{text}'")
    return values


def _number(kind: type, minimum: float, inclusive: bool):
    """An argparse type: `kind` (int or float) at least (or above) `minimum`, with a one-line error."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if v < minimum or (v == minimum and not inclusive):
            rule = "must not be negative" if inclusive else "must be positive"
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return v

    return parse


_positive_int = _number(int, 0, inclusive=False)
_non_negative_int = _number(int, 0, inclusive=True)
_positive_float = _number(float, 0, inclusive=False)


def add_long_context_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --long-context, --max-context, --dca-* and --yarn-* (absent: config.json's method, else DCA)."""
    g = parser.add_argument_group(
        "long context",
        "On by default: a model whose config.json names no method gets Dual Chunk Attention with its trained "
        "window as chunk (plain attention up to there) and a context limit of 4 windows",
    )
    g.add_argument(
        "--long-context",
        choices=("off", "dca", "yarn"),
        default=None,
        help="off: plain attention, the trained window; dca / yarn: that method "
        "(default: the config's method, else dca)",
    )
    g.add_argument(
        "--max-context",
        type=_positive_int,
        metavar="N",
        help="the context limit in tokens (default: 4 trained windows under DCA or YaRN, 131072 for 32K models)",
    )
    g.add_argument(
        "--dca-chunk-size",
        type=_positive_int,
        metavar="N",
        help="switch Dual Chunk Attention on: the largest relative position used (e.g. the training length, 32768)",
    )
    g.add_argument(
        "--dca-local-size",
        type=_positive_int,
        metavar="N",
        help="DCA local window; the chunk period is chunk size minus this (default: chunk size / 8)",
    )
    g.add_argument(
        "--dca-original-max-position-embeddings",
        type=_non_negative_int,
        metavar="N",
        default=0,
        help="length beyond which DCA raises the attention temperature (default 0: never)",
    )
    g.add_argument(
        "--yarn-factor",
        type=_positive_float,
        metavar="F",
        help="switch static YaRN on with this context-extension factor (e.g. 4.0)",
    )
    g.add_argument(
        "--yarn-original-max-position-embeddings",
        type=_positive_int,
        metavar="N",
        help="training length YaRN scales from (default: the model's max_position_embeddings)",
    )
    return parser


def add_kv_cache_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --kv-bits, --kv-group-size, --quantized-kv-start (mlx-lm's switches; absent: a float cache)."""
    g = parser.add_argument_group("KV cache", "Quantize the KV cache to fit longer contexts in memory")
    g.add_argument(
        "--kv-bits",
        type=kv_bits_arg,
        default=None,
        metavar="{4,8,auto}",
        help="bits per cached key and value; auto: floats until the cache would pass --memory-budget, then 8",
    )
    g.add_argument(
        "--memory-budget",
        type=memory_budget_arg,
        default=None,
        metavar="SIZE",
        help="for --kv-bits auto, e.g. 4GB (default: the device's recommended working set, else 3/4 of RAM)",
    )
    g.add_argument(
        "--kv-group-size",
        type=int,
        choices=(32, 64, 128),
        default=64,
        help="elements sharing a scale and bias (default: %(default)s; must divide the head size)",
    )
    g.add_argument(
        "--quantized-kv-start",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="keep the cache in floats until it holds N tokens (default: %(default)s)",
    )
    return parser


def kv_bits_arg(text: str):
    """--kv-bits: 4, 8 or auto."""
    if text.strip().lower() == "auto":
        return "auto"
    if text.strip() in ("4", "8"):
        return int(text)
    raise argparse.ArgumentTypeError(f"takes 4, 8 or auto, not {text!r}")


def memory_budget_arg(text: str) -> int:
    """--memory-budget: a size such as 4GB, in bytes."""
    from qwen2_mlx.generation.kv_budget import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("memory_budget", "--memory-budget")) from None


def kv_cache_settings(args: argparse.Namespace) -> dict:
    """`kv_bits`, `kv_group_size`, `quantized_kv_start` (and `memory_budget` when given) for generation calls
    (kv_bits None: a float cache; "auto": 8 bits once the float cache would pass the budget)."""
    kv = {
        "kv_bits": getattr(args, "kv_bits", None),
        "kv_group_size": getattr(args, "kv_group_size", 64),
        "quantized_kv_start": getattr(args, "quantized_kv_start", 0),
    }
    if getattr(args, "memory_budget", None) is not None:
        kv["memory_budget"] = args.memory_budget
    return kv


def long_context_overrides(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """`dict(dca=, rope_scaling=, long_context=, max_context=)` for `load(path, **overrides)`; None changes nothing.

    Bad combinations raise ConfigError naming the switch, or exit 2 via `parser.error` if a parser is given.
    """
    try:
        return _overrides(args)
    except ConfigError as e:
        if parser is not None:
            parser.error(str(e))
        raise


def _overrides(args: argparse.Namespace) -> dict:
    chunk = getattr(args, "dca_chunk_size", None)
    local = getattr(args, "dca_local_size", None)
    temp_len = getattr(args, "dca_original_max_position_embeddings", 0) or 0
    dca = None
    if chunk is None:
        if local is not None or temp_len:
            raise ConfigError(
                "command line",
                "--dca-chunk-size",
                "is required with --dca-local-size / --dca-original-max-position-embeddings",
            )
    else:
        if local is None:
            local = max(1, chunk // 8)  # vLLM's default ratio (1024 / 8192)
        dca = {"chunk_size": chunk, "local_size": local, "original_max_position_embeddings": temp_len}
        parse_dca(dca, "command line (--dca-*)")

    factor = getattr(args, "yarn_factor", None)
    orig = getattr(args, "yarn_original_max_position_embeddings", None)
    rope_scaling = None
    if factor is None:
        if orig is not None:
            raise ConfigError(
                "command line", "--yarn-factor", "is required with --yarn-original-max-position-embeddings"
            )
    else:
        if dca is not None:
            raise ConfigError(
                "command line",
                "--yarn-factor",
                "cannot be combined with --dca-chunk-size (DCA uses plain RoPE frequencies)",
            )
        rope_scaling = {"rope_type": "yarn", "factor": factor}
        if orig is not None:
            rope_scaling["original_max_position_embeddings"] = orig
        _parse_rope_scaling(rope_scaling, "command line (--yarn-*)")
    mode = getattr(args, "long_context", None)
    if (mode == "off" and (dca or rope_scaling)) or (mode == "dca" and rope_scaling) or (mode == "yarn" and dca):
        raise ConfigError("command line", "--long-context", f"{mode} cannot be combined with --dca-* / --yarn-*")
    return {
        "dca": dca,
        "rope_scaling": rope_scaling,
        "long_context": mode,
        "max_context": getattr(args, "max_context", None),
    }
