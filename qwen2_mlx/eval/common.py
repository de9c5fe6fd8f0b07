"""What every eval subcommand shares: the model options, loading with long-context settings,
the settings that identify a run (for resumable results files), and the progress bar."""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qwen2_mlx.arguments import (
    DTYPE_NAMES,
    add_kv_cache_args,
    add_long_context_args,
    int_list,
    kv_cache_settings,
    long_context_overrides,
    mlx_dtype,
)
from qwen2_mlx.loading.paths import default_model_path
from qwen2_mlx.runtime.blas import mlx_uses_cpu


class EvalError(ValueError):
    """A user error: the CLI prints the message on one line and exits with status 2."""


def default_dtype() -> str:
    """float32 on a Linux CPU (the fast path there); elsewhere keep the checkpoint's dtype."""
    return "float32" if platform.system() == "Linux" and mlx_uses_cpu() else "auto"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help=f"model folder (default: {default_model_path()})")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default=default_dtype(),
        help="compute dtype (default: %(default)s; 'auto' keeps the checkpoint's)",
    )
    parser.add_argument(
        "--prefill-step-size", type=int, default=512, metavar="N", help="tokens per prefill step (default: %(default)s)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        metavar="FILE",
        help="resumable results file (JSON lines): finished units are skipped on re-run",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results as JSON")
    add_long_context_args(parser)
    add_kv_cache_args(parser)


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    path: Path
    settings: dict  # what identifies the model side of a run: folder, dtype, DCA, YaRN, KV-cache bits

    @property
    def kv(self) -> dict:
        defaults = {"kv_bits": None, "kv_group_size": 64, "quantized_kv_start": 0}  # a float cache
        return {k: self.settings.get(k, v) for k, v in defaults.items()}

    @property
    def label(self) -> str:
        """A short description for titles: folder name plus the long-context settings."""
        parts = [self.path.name]
        dca = self.settings.get("dca")
        if dca:
            parts.append(
                f"DCA chunk {dca['chunk_size']}, local {dca['local_size']}"
                + (f", L0 {dca['original_max_position_embeddings']}" if dca["original_max_position_embeddings"] else "")
            )
        rs = self.settings.get("rope_scaling")
        if rs:
            parts.append(f"YaRN x{rs['factor']:g}")
        if not dca and not rs:
            parts.append("no DCA")
        if self.settings.get("kv_bits"):
            parts.append(f"{self.settings['kv_bits']}-bit KV cache")
        return " · ".join(parts)


def load_for_eval(args: argparse.Namespace) -> LoadedModel:
    """Load the model named by --model with the long-context switches; user errors become EvalError."""
    from qwen2_mlx.generation.kv_quant import KVQuantization
    from qwen2_mlx.loading.loader import ModelLoadError, load, resolve_path
    from qwen2_mlx.loading.tokenizer import TokenizerError
    from qwen2_mlx.models.config import ConfigError

    if args.prefill_step_size <= 0:
        raise EvalError(f"--prefill-step-size must be positive, got {args.prefill_step_size}")
    try:
        overrides = long_context_overrides(args)
        path = resolve_path(args.model or default_model_path()).resolve()
        dtype = mlx_dtype(args.dtype)
        model, tokenizer = load(path, dtype=dtype, **overrides)
        KVQuantization.make(**kv_cache_settings(args), model=model)
    except (ModelLoadError, ConfigError, TokenizerError, ValueError) as e:
        raise EvalError(str(e)) from None
    settings = {
        "model": str(path),
        "dtype": args.dtype,
        "dca": overrides.get("dca"),
        "rope_scaling": overrides.get("rope_scaling"),
        **kv_cache_settings(args),
    }
    return LoadedModel(model, tokenizer, path, settings)


def parse_int_list(text: str, name: str, minimum: int = 0, maximum: Optional[int] = None) -> list[int]:
    """'1024,2048' -> [1024, 2048]; a clear EvalError for anything else (arguments.py's rules)."""
    try:
        return int_list(text, name, minimum, maximum)
    except ValueError as e:
        raise EvalError(str(e)) from None


def progress(total: int, desc: str):
    """A tqdm bar on stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, unit="unit", dynamic_ncols=True, leave=True)


def read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise EvalError(f"{path}: no such {what} file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise EvalError(f"{path}: cannot be read ({e.strerror})") from None


def check_out(path: Path, flag: str) -> None:
    if path.is_dir():
        raise EvalError(f"{flag} {path}: is a folder; expected a file")
    if not path.parent.is_dir():
        raise EvalError(f"{flag} {path}: folder {path.parent} does not exist")
