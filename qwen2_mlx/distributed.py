"""Tensor-parallel Qwen2 and Qwen2-MoE on MLX's distributed engine (`mx.distributed`, `mlx.launch`).

Megatron-style sharding with mlx's own layers (`mlx.nn.layers.distributed`), as mlx-lm does it:
q/k/v and gate/up are split by output rows ("all-to-sharded"), o_proj and down_proj by input columns
("sharded-to-all", one `all_sum` each). MoE experts keep all E experts on every rank but each holds
1/N of every expert's intermediate dimension (`shard_inplace`); the shared expert is split the same
way and the block does a single `all_sum` of routed + shared output. The router and the
shared-expert gate are replicated, so every rank routes every token identically.

Run it on one machine or several (see README, "Several Macs"):

    mlx.launch -n 2 --backend ring -- python -m qwen2_mlx.distributed --model PATH --prompt "hi"
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx.utils import tree_flatten

from .cli_args import add_long_context_args, long_context_overrides
from .mlp import MLP
from .moe import SparseMoeBlock


class ShardingError(ValueError):
    """A model that cannot be split over the given number of ranks; the message is one line."""


def _quant_group(module: nn.Module) -> Optional[int]:
    return getattr(module, "group_size", None) if hasattr(module, "scales") else None


def shard_problems(model: nn.Module, n: int) -> list[str]:
    """Why `model` cannot be split over `n` ranks (an empty list when it can)."""
    if n <= 1:
        return []
    args = model.args
    problems = []

    def need(name: str, count: int):
        if count % n:
            problems.append(f"{name} ({count}) does not divide by {n} ranks")

    need("num_attention_heads", args.num_attention_heads)
    need("num_key_value_heads", args.num_key_value_heads)
    layers = model.layers
    if any(isinstance(layer.mlp, MLP) for layer in layers):
        need("intermediate_size", args.intermediate_size)
    if any(isinstance(layer.mlp, SparseMoeBlock) for layer in layers):
        need("moe_intermediate_size", args.moe_intermediate_size)
        need("shared_expert_intermediate_size", args.shared_expert_intermediate_size)
    if problems:
        return problems

    # A quantized layer split by input columns must cut at quantization-group boundaries.
    seen = set()
    for layer in layers:
        cols = [("o_proj", layer.self_attn.o_proj)]
        if isinstance(layer.mlp, MLP):
            cols.append(("intermediate_size", layer.mlp.down_proj))
        else:
            cols.append(("moe_intermediate_size", layer.mlp.switch_mlp.down_proj))
            cols.append(("shared_expert_intermediate_size", layer.mlp.shared_expert.down_proj))
        for name, module in cols:
            gs = _quant_group(module)
            if gs is None:
                continue
            in_dims = module.weight.shape[-1] * 32 // module.bits
            if (in_dims // n) % gs and name not in seen:
                seen.add(name)
                problems.append(f"{name} ({in_dims}) split over {n} ranks gives {in_dims // n} columns, "
                                f"not a multiple of the quantization group size {gs}")
    return problems


def check_shardable(model: nn.Module, n: int) -> None:
    """Raise ShardingError (one line) when `model` cannot be split over `n` ranks."""
    problems = shard_problems(model, n)
    if problems:
        raise ShardingError(f"cannot shard {model.args.model_type} over {n} ranks: " + "; ".join(problems))


def shard_model(model: nn.Module, group: Optional[mx.distributed.Group] = None) -> nn.Module:
    """Split `model` in place over `group` (default: the global group) and return it."""
    group = group or mx.distributed.init()
    n = group.size()
    if n == 1:
        return model
    check_shardable(model, n)
    for layer in model.layers:
        attn = layer.self_attn
        attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
        attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
        attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads //= n
        attn.n_kv_heads //= n
        mlp = layer.mlp
        if isinstance(mlp, MLP):
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
        else:
            # In place: the block sums routed and shared partial outputs itself, in one all_sum.
            for expert in (mlp.switch_mlp, mlp.shared_expert):
                shard_inplace(expert.gate_proj, "all-to-sharded", group=group)
                shard_inplace(expert.up_proj, "all-to-sharded", group=group)
                shard_inplace(expert.down_proj, "sharded-to-all", group=group)
            mlp.sharding_group = group
    return model


def materialize(model: nn.Module) -> None:
    """Evaluate the weights one layer at a time, so a rank never holds more than one unsharded layer."""
    for layer in model.layers:
        mx.eval(layer.parameters())
        mx.clear_cache()
    mx.eval(model.parameters())
    mx.clear_cache()


# safetensors dtypes numpy can memory-map (bfloat16 as its raw 16 bits, reinterpreted by MLX).
_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32,
              "I32": np.int32, "U16": np.uint16, "I16": np.int16, "U8": np.uint8, "I8": np.int8,
              "I64": np.int64, "U64": np.uint64}


def _safetensors_index(files: list[Path]) -> dict:
    """tensor name -> (file, offset of the data section, header entry), from the headers alone."""
    index = {}
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for name, info in header.items():
            index[name] = (f, 8 + n, info)
    return index


def _read_part(file: Path, base: int, info: dict, axis: int, part: int, n: int) -> Optional[mx.array]:
    """Part `part` of `n` along `axis` of one stored tensor, touching only those bytes of the file."""
    np_dtype = _NP_DTYPES.get(info["dtype"])
    if np_dtype is None:
        return None
    shape = tuple(info["shape"])
    mm = np.memmap(file, dtype=np_dtype, mode="r", offset=base + info["data_offsets"][0], shape=shape)
    size = shape[axis] // n
    index = [slice(None)] * len(shape)
    index[axis] = slice(part * size, (part + 1) * size)
    arr = mx.array(np.ascontiguousarray(mm[tuple(index)]))
    del mm
    return arr.view(mx.bfloat16) if info["dtype"] == "BF16" else arr


def read_own_slices(model: nn.Module, files: list[Path], group: mx.distributed.Group) -> int:
    """Give each split parameter of a sharded (still lazy) model its slice read straight from disk.

    Applies where the checkpoint stores the tensor under the parameter's own name (our converter's
    and mlx-lm's folders; `sanitize` leaves such names and values alone), so a rank reads only its
    rows of q/k/v/gate/up and its columns of o/down. Others keep the lazy read-then-slice path.
    Returns how many parameters were read this way.
    """
    n, rank = group.size(), group.rank()
    index = _safetensors_index(files)
    parts = []
    for name, p in tree_flatten(model.parameters()):
        entry = index.get(name)
        if entry is None:
            continue
        file, base, info = entry
        shape = tuple(info["shape"])
        diff = [i for i, (a, b) in enumerate(zip(shape, p.shape)) if a != b]
        if len(shape) != p.ndim or len(diff) != 1 or shape[diff[0]] != n * p.shape[diff[0]]:
            continue
        arr = _read_part(file, base, info, diff[0], rank, n)
        if arr is not None:
            parts.append((name, arr.astype(p.dtype)))
    model.load_weights(parts, strict=False)
    return len(parts)


def sharded_load(path: Union[str, Path], group: Optional[mx.distributed.Group] = None, *,
                 dtype: Optional[mx.Dtype] = None, dca: Optional[dict] = None,
                 rope_scaling: Optional[dict] = None):
    """Load a model folder split over `group`. Returns (model, tokenizer).

    Each rank reads only its slice of every split tensor from disk (`read_own_slices`); tensors that
    `sanitize` has to rebuild are read lazily and sliced before evaluation, one layer at a time. So
    each rank keeps only its shard plus the replicated embeddings, norms and router.
    A model that does not divide over the ranks fails before any weight is read. `dca` and
    `rope_scaling` are `load`'s long-context overrides.
    """
    from .loader import load, resolve_path, weight_files

    group = group or mx.distributed.init()
    model, tokenizer = load(path, dca=dca, lazy=True, dtype=dtype, rope_scaling=rope_scaling)
    shard_model(model, group)
    if group.size() > 1:
        read_own_slices(model, weight_files(resolve_path(path)), group)
    materialize(model)
    # A barrier, so no rank starts a collective while another is still reading its weights.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model, tokenizer


def peak_rss_gb() -> float:
    """This process's peak resident memory in GB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qwen2_mlx.distributed",
        description="Generate with a Qwen2 model split over the ranks of `mlx.launch` (tensor parallel). "
                    "Every rank runs this same command; rank 0 prints.",
        epilog="example: mlx.launch -n 2 --backend ring -- python -m qwen2_mlx.distributed --model PATH --prompt hi")
    p.add_argument("--model", help="model folder (default: the folder `python convert.py` writes)")
    p.add_argument("--prompt", help="the user message")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="send --prompt as is, without the chat template")
    p.add_argument("--interactive", action="store_true",
                   help="line-based chat: each line of stdin is a user turn (mlx.launch forwards stdin to every rank)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed; the same on every rank")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="cast floating weights (float32 is fastest on a CPU)")
    p.add_argument("--backend", default="any", help="mx.distributed backend (default: whatever mlx.launch set up)")
    p.add_argument("--verbose", action="store_true", help="print speed and per-rank memory on stderr")
    return add_long_context_args(p)


def _prompt_tokens(tokenizer, messages: list, raw: bool) -> list[int]:
    if raw:
        return tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def main(argv: Optional[list] = None) -> int:
    from .blas import ensure_openblas
    from .chat import Chat
    from .config import ConfigError
    from .generate import stream_generate
    from .loader import ModelLoadError
    from .paths import default_model_path
    from .tokenizer import TokenizerError

    ensure_openblas(argv)  # Linux CPU: re-run with OpenBLAS preloaded (qwen2_mlx/blas.py)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.interactive == (args.prompt is not None):
        parser.error("give either --prompt or --interactive")
    if args.raw and args.interactive:
        parser.error("--raw applies to --prompt only (the interactive chat uses the chat template)")
    if args.max_tokens <= 0:
        parser.error("--max-tokens must be positive")
    overrides = long_context_overrides(args, parser)
    group = mx.distributed.init(backend=args.backend)
    rank, size = group.rank(), group.size()
    lead = rank == 0

    def say(msg: str):
        if lead:
            print(msg, file=sys.stderr, flush=True)

    path = Path(args.model).expanduser() if args.model else default_model_path()
    say(f"[rank 0/{size}] loading {path}")
    try:
        model, tokenizer = sharded_load(path, group, dtype=_DTYPES.get(args.dtype), **overrides)
    except (ShardingError, ConfigError, ModelLoadError, TokenizerError) as e:
        say(f"error: {e}")
        return 2
    if args.verbose:
        print(f"[rank {rank}/{size}] loaded: peak memory {mx.get_peak_memory() / 1e9:.2f} GB (MLX), "
              f"{peak_rss_gb():.2f} GB (RSS)", file=sys.stderr, flush=True)

    def show(responses) -> None:
        last = None
        for last in responses:
            if lead:
                print(last.text, end="", flush=True)
        if lead:
            print(flush=True)
            if args.verbose and last is not None:
                say(f"[{last.finish_reason}] prompt {last.prompt_tokens} tok at {last.prompt_tps:.1f} tok/s, "
                    f"generation {last.generation_tokens} tok at {last.generation_tps:.1f} tok/s over {size} ranks")

    sampling = dict(temperature=args.temp, top_p=args.top_p, seed=args.seed)
    if not args.interactive:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        try:
            show(stream_generate(model, tokenizer, _prompt_tokens(tokenizer, messages, args.raw),
                                 args.max_tokens, **sampling))
        except ValueError as e:  # the prompt does not fit the context window
            say(f"error: {e}")
            return 2
        return 0
    # Every rank reads the same stdin (mlx.launch forwards it to all), so every rank's Chat sees the
    # same turns, reuses the same cached prefix and stays in step with the others.
    chat = Chat(model, tokenizer, system=args.system, context_policy="drop_oldest",
                max_tokens=args.max_tokens, **sampling)
    say("[interactive] type a message per line; an empty line or end of input quits")
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            break
        try:
            show(chat.stream(line))
        except ValueError as e:  # a single message longer than the context window
            say(f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
