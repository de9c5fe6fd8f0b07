"""Source (GGUF file or checkpoint folder) -> MLX model folder, one tensor at a time.

`convert()` checks everything it can before writing a byte: config fields, tensor names and shapes
against the model skeleton, quantization options, free disk space. Then each tensor is read (or
dequantized), cast, quantized if asked and handed to the writer, which flushes full shards.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen2_mlx.models.config import ConfigError, ModelArgs

from .errors import ConvertError
from .quantize import QuantPlan, dequantize_tensor, quantize_tensor, quantized_nbytes
from .writer import MAX_SHARD_BYTES, ModelWriter, check_disk_space, check_target, folder_size

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


@dataclass
class Result:
    path: Path
    bits_per_weight: float
    size_bytes: int
    quantization: Optional[dict]
    dtype: Optional[str]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _progress(total: int, desc: str):
    """A tqdm bar on stderr when stderr is a terminal, else nothing (CI logs stay short)."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with huggingface_hub; be safe anyway
        return None
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


def convert(
    source,
    mlx_path: str | Path,
    quantize: bool = False,
    q_group_size: Optional[int] = None,
    q_bits: Optional[int] = None,
    q_mode: str = "affine",
    quant_predicate: Optional[str] = None,
    dtype: Optional[str] = None,
    dequantize: bool = False,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    log: Callable[[str], None] = _log,
) -> Result:
    """Write `source` (GGUFSource or FolderSource) as an MLX model folder at `mlx_path`."""
    from qwen2_mlx.models.model import Model

    target = Path(mlx_path).expanduser().absolute()
    check_target(target, force)
    _check_options(source, quantize, dequantize, q_bits, q_group_size, quant_predicate, dtype)
    config = dict(source.config)
    try:
        args = ModelArgs.from_dict(config, str(getattr(source, "path", "config")))
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    if dtype is None:
        dtype = config.get("torch_dtype") or config.get("dtype")
        dtype = dtype if dtype in DTYPES else None
    out_dtype = DTYPES.get(dtype)

    # The skeleton gives module types and expected shapes; its random parameters stay unevaluated.
    model = Model(args)
    expected = dict(tree_flatten(model.parameters()))
    plan = QuantPlan(model, q_group_size, q_bits, q_mode, quant_predicate) if quantize else None
    names = source.tensor_names()
    src_quant = source.quantization
    quantized_layers = {n[: -len(".scales")] for n in names if n.endswith(".scales")} if src_quant else set()
    weights = _check_tensors(source, names, expected, quantized_layers)
    present = set(names)
    jobs, needed = _plan(source, weights, present, expected, quantized_layers, plan, out_dtype, dequantize)
    check_disk_space(target, needed)

    quant_block = plan.config_block() if plan is not None else (None if dequantize else src_quant)
    what = "quantizing to " + (quant_predicate or f"{plan.bits} bits") if plan else (dtype or "original dtype")
    log(f"Converting {len(jobs)} tensors ({what}) into {target}")
    bar = _progress(len(jobs), "converting")
    with ModelWriter(target, force=force, max_shard_bytes=max_shard_bytes) as writer:
        for job in jobs:
            _write_tensor(writer, source, job, present, out_dtype)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        _write_config(writer.folder, config, dtype, quant_block)
        source.write_tokenizer(writer.folder)
        written = writer.total_bytes

    params_count = sum(_numel(v.shape) for v in expected.values())
    return Result(target, written * 8 / params_count, folder_size(target), quant_block, dtype)


def _check_options(source, quantize, dequantize, q_bits, q_group_size, quant_predicate, dtype) -> None:
    if quantize and dequantize:
        raise ConvertError("choose either -q/--quantize or -d/--dequantize, not both")
    if quantize and source.quantization:
        raise ConvertError(
            f"{source.path}: is already quantized; add -d to dequantize it, or convert from the float checkpoint"
        )
    if (q_bits or q_group_size or quant_predicate) and not quantize:
        raise ConvertError("--q-bits, --q-group-size and --quant-predicate need -q/--quantize")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown --dtype {dtype!r} (choose from {', '.join(DTYPES)})")


def _check_tensors(source, names: list, expected: dict, quantized_layers: set) -> list:
    """The source's weight names (no quantization scales), refused unless they match the config's shapes."""
    extras = {f"{q}.{s}" for q in quantized_layers for s in ("scales", "biases")}
    weights = [n for n in names if n not in extras]
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = [f"missing {len(missing)} tensors (e.g. {missing[0]})"] if missing else []
        parts += [f"unexpected {len(unexpected)} tensors (e.g. {unexpected[0]})"] if unexpected else []
        raise ConvertError(f"{source.path}: weights do not match the config: " + "; ".join(parts))
    for n in weights:
        layer, kind = n.rsplit(".", 1)
        if not (kind == "weight" and layer in quantized_layers) and tuple(source.shape(n)) != tuple(expected[n].shape):
            raise ConvertError(
                f"{source.path}: tensor {n} has shape {tuple(source.shape(n))}, "
                f"the config implies {tuple(expected[n].shape)}"
            )
    return weights


def _plan(source, weights, present, expected, quantized_layers, plan, out_dtype, dequantize) -> tuple[list, int]:
    """Every tensor's (name, layer, (action, params)) and the bytes they will take, before writing anything."""
    src_layer_params = _source_layer_params(source.quantization)
    jobs, needed = [], 0
    for n in weights:
        layer, kind = n.rsplit(".", 1)
        shape = tuple(expected[n].shape)
        size = out_dtype.size if out_dtype is not None else source.dtype(n).size
        if kind == "weight" and layer in quantized_layers:
            action = ("dequantize", src_layer_params(layer)) if dequantize else ("copy", None)
            needed += (
                _numel(shape) * size
                if dequantize
                else sum(
                    _numel(source.shape(f"{layer}.{s}")) * source.dtype(f"{layer}.{s}").size
                    for s in ("weight", "scales", "biases")
                    if f"{layer}.{s}" in present
                )
            )
        elif plan is not None and kind == "weight" and (params := plan.params_for(layer)) is not None:
            action = ("quantize", params)
            needed += quantized_nbytes(shape, size, params)
        else:
            action = ("cast", None)
            needed += _numel(shape) * size
        jobs.append((n, layer, action))
    return jobs, needed


def _write_tensor(writer, source, job: tuple, present: set, out_dtype) -> None:
    """Copy, dequantize, quantize or cast one planned tensor into the writer, then let the source free it."""
    n, layer, (action, params) = job
    if action == "copy":
        for s in ("weight", "scales", "biases"):
            if f"{layer}.{s}" in present:
                writer.add(f"{layer}.{s}", source.tensor(f"{layer}.{s}"))
                _release(source, f"{layer}.{s}")
    elif action == "dequantize":
        parts = {s: source.tensor(f"{layer}.{s}") for s in ("weight", "scales", "biases") if f"{layer}.{s}" in present}
        w = dequantize_tensor(parts, params)
        writer.add(n, w.astype(out_dtype) if out_dtype is not None else w)
        for s in parts:
            _release(source, f"{layer}.{s}")
    else:
        w = source.tensor(n)
        if out_dtype is not None and mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(out_dtype)
        if action == "quantize":
            for s, t in quantize_tensor(w, params).items():
                writer.add(f"{layer}.{s}", t)
        else:
            writer.add(n, w)
        _release(source, n)


def _write_config(folder: Path, config: dict, dtype: Optional[str], quant_block: Optional[dict]) -> None:
    from mlx_lm.utils import save_config

    out_cfg = dict(config)
    for key in ("quantization", "quantization_config", "_name_or_path"):
        out_cfg.pop(key, None)
    if dtype is not None:
        out_cfg["torch_dtype"] = dtype
    if quant_block:
        out_cfg["quantization"] = quant_block
        out_cfg["quantization_config"] = quant_block
    save_config(out_cfg, folder / "config.json")


def _release(source, name: str) -> None:
    release = getattr(source, "release", None)
    if release is not None:
        release(name)


def _source_layer_params(quant: Optional[dict]):
    """Per-layer quantization parameters of an already quantized (mlx-lm) source."""

    def params(layer: str) -> dict:
        q = quant or {}
        p = q.get(layer)
        base = {"group_size": q.get("group_size", 64), "bits": q.get("bits", 4), "mode": q.get("mode", "affine")}
        if isinstance(p, dict):
            base.update(p)
        return base

    return params
