"""KV caches for generation: make, trim, save and load.

The model decides which cache each layer gets (`model.make_cache()`); callers only ask for one here.
Saved caches use mlx-lm's file layout (safetensors, cache classes and scalars in the metadata) and
add the model's shape and long-context settings, so a cache is never loaded into a model that
would read its keys differently (another RoPE base, YaRN factor or DCA chunking).
"""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, QuantizedKVCache, can_trim_prompt_cache, trim_prompt_cache

from qwen2_mlx.models.dca import DCAGeometry, long_context_signature, plain_keys, stored_keys
from qwen2_mlx.models.kv_cache import DCAKVCache, QuantizedDCAKVCache

SIGNATURE_KEY = "qwen2_mlx_signature"
META_STATE_KEY = "qwen2_mlx_meta_state"  # per layer; mlx-lm's layout no longer saves it


class PromptCacheError(ValueError):
    """A prompt cache file that cannot be used; the message names the file."""


class PromptCacheMismatch(PromptCacheError):
    """A whole prompt cache made for other settings (e.g. saved before long context was on by default)."""


def make_prompt_cache(model: nn.Module) -> list:
    """One KV cache per layer, as the model wants them."""
    return model.make_cache()


def to_dca_cache(cache: list, model: nn.Module) -> list:
    """A plain cache of a DCA model (a batch row's, at most `chunk_size + 1` tokens; quantized, at most its
    period) as the model's own DCA cache, keys past the period rotated as DCA stores them; others as they are."""
    geom = _geometry(model)
    if geom is None or not cache or not all(type(c) in (KVCache, QuantizedKVCache) for c in cache):
        return cache
    out = []
    for layer, c in zip(model.layers, cache):
        settings = (geom.chunk_size, geom.local_size, geom.original_max_position_embeddings)
        if type(c) is QuantizedKVCache:  # quantized keys cannot be re-rotated: within the period they need not be
            if c.offset > geom.period:
                raise ValueError(f"a quantized cache of {c.offset} tokens is past DCA's period ({geom.period})")
            d = QuantizedDCAKVCache(c.group_size, c.bits, *settings)
            d.keys, d.values, d.offset = c.keys, c.values, c.offset
            out.append(d)
            continue
        out.append(_rekeyed(c, DCAKVCache(*settings), stored_keys, layer.self_attn.rope, geom))
    return out


def to_plain_cache(cache: list, model: nn.Module) -> list:
    """A DCA model's float DCA cache of at most `chunk_size + 1` tokens as plain `KVCache`s, for a batch."""
    geom = _geometry(model)
    if geom is None or not cache or not all(type(c) is DCAKVCache for c in cache):
        return cache
    return [_rekeyed(c, KVCache(), plain_keys, layer.self_attn.rope, geom) for layer, c in zip(model.layers, cache)]


def _rekeyed(c: KVCache, into: KVCache, turn, rope, geom: DCAGeometry) -> KVCache:
    """`into` holding what `c` holds, its keys turned by `turn` (plain_keys or stored_keys)."""
    if c.keys is not None:
        if c.offset > geom.plain_limit:  # past it, DCA keys have no plain form (and plain keys no DCA scores)
            raise ValueError(f"a cache of {c.offset} tokens is past DCA's plain range ({geom.plain_limit} tokens)")
        into.keys = turn(rope, c.keys[..., : c.offset, :], geom)
        into.values, into.offset = c.values[..., : c.offset, :], c.offset
    return into


def _geometry(model: nn.Module) -> Optional[DCAGeometry]:
    dca = getattr(model.args, "dual_chunk_attention_config", None)
    return DCAGeometry.from_config(dca) if dca is not None else None


def model_signature(model: nn.Module) -> dict:
    """What a saved cache must agree on with the model it is loaded into: shapes and RoPE/DCA settings."""
    args = model.args
    sig = {
        "model_type": args.model_type,
        "num_hidden_layers": args.num_hidden_layers,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.head_dim,
    }
    sig.update(long_context_signature(args))
    return json.loads(json.dumps(sig))  # the form it takes after a round trip through the file


def _portable(c: Any) -> Any:
    """A DCA layer within its period holds plain RoPE keys: saved as mlx-lm's class, so mlx-lm reads the
    file (the DCA settings are in the signature, and `load_prompt_cache` gives a DCA model its own class)."""
    if type(c) not in (DCAKVCache, QuantizedDCAKVCache) or c.offset > c.chunk_size - c.local_size:
        return c
    out = KVCache() if type(c) is DCAKVCache else QuantizedKVCache(group_size=c.group_size, bits=c.bits)
    out.keys, out.values, out.offset = c.keys, c.values, c.offset
    return out


def _compact(c: Any) -> Any:
    """A KVCache keeps spare capacity (and trimmed tokens) past `offset`: save only what it holds."""
    if isinstance(c, KVCache) and c.keys is not None and c.keys.shape[2] > c.offset:
        out = copy.copy(c)
        out.keys, out.values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
        return out
    if isinstance(c, QuantizedKVCache) and c.keys is not None and c.keys[0].shape[2] > c.offset:
        out = copy.copy(c)
        out.keys, out.values = (tuple(t[..., : c.offset, :] for t in x) for x in (c.keys, c.values))
        return out
    return c


def cache_nbytes(cache: list) -> int:
    """Bytes the arrays of `cache` take in a saved file (what each layer holds, not its spare room)."""
    return sum(a.nbytes for c in cache for _, a in tree_flatten(_compact(c).state) if isinstance(a, mx.array))


def _atomic_target(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")


_SAFETENSORS_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.int64: "I64",
    mx.uint64: "U64",
    mx.uint16: "U16",
    mx.int16: "I16",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.bool_: "BOOL",
}


def _write_safetensors(path: Path, arrays: dict, metadata: dict) -> None:
    """`mx.save_safetensors`, one array at a time: it evaluates every (sliced) array before writing,
    which doubles the memory of a large cache; here at most one layer's copy exists at once."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, a in arrays.items():
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as the format asks
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for a in arrays.values():
            if a.size:
                flat = mx.contiguous(a).reshape(-1).view(mx.uint8)
                mx.eval(flat)
                f.write(memoryview(flat))
                del flat
        f.flush()
        os.fsync(f.fileno())  # the rename that follows must not publish a file still in the page cache only


def _save_mlx_lm_layout(path: Path, cache: list, metadata: dict) -> None:
    """mlx-lm's `save_prompt_cache` layout (arrays, then metadata/classes/scalars), written streaming."""
    scalars: list = [""]  # must be non-empty, or tree_flatten drops it

    def as_array(i: str, data: Any) -> mx.array:
        if isinstance(data, mx.array):
            return data
        if isinstance(data, (int, float, bool)):
            scalars.append((i, "scalar"))
            return mx.array(data)
        if isinstance(data, str):
            scalars.append((i, "string"))
            return mx.array([ord(ch) for ch in data])
        if data is None:
            scalars.append((i, "none"))
            return mx.array([])
        raise PromptCacheError(f"{path}: the cache state is not serializable: {type(data).__name__}")

    arrays = {i: as_array(i, d) for i, d in tree_flatten([c.state for c in cache])}
    meta = dict(tree_flatten([metadata, [type(c).__name__ for c in cache], scalars]))
    _write_safetensors(path, arrays, meta)


def save_prompt_cache(
    file_name: Union[str, Path], cache: list, metadata: Optional[dict] = None, model: Optional[nn.Module] = None
) -> None:
    """Save a prompt cache as safetensors (mlx-lm's layout); with `model`, record its signature.

    `metadata` maps strings to strings (no dots in keys, as in mlx-lm). The file is written to a
    temporary name first, so an interrupted save never leaves a half-written cache behind.
    """
    path = Path(file_name)
    if path.suffix != ".safetensors":
        raise PromptCacheError(f"{path}: a prompt cache file name must end in .safetensors")
    if not cache or any(getattr(c, "keys", True) is None for c in cache):
        raise PromptCacheError(f"{path}: the prompt cache is empty; prefill it before saving")
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str) or "." in k:
            raise PromptCacheError(f"{path}: metadata must map strings without dots to strings (key {k!r})")
    if model is not None:
        meta[SIGNATURE_KEY] = json.dumps(model_signature(model), sort_keys=True)
    cache = [_portable(c) for c in cache]
    meta_states = [list(getattr(c, "meta_state", None) or []) for c in cache]
    if any(meta_states):
        meta[META_STATE_KEY] = json.dumps(meta_states)
    tmp = _atomic_target(path)
    try:
        _save_mlx_lm_layout(tmp, [_compact(c) for c in cache], meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cache_class(name: str, path: Path):
    # the cache classes of our models first, then mlx-lm's
    cls = {"DCAKVCache": DCAKVCache, "QuantizedDCAKVCache": QuantizedDCAKVCache}.get(name)
    if not (isinstance(cls, type) and hasattr(cls, "from_state")):
        cls = getattr(mlx_cache, name, None)
    if not (isinstance(cls, type) and hasattr(cls, "from_state")):
        raise PromptCacheError(f"{path}: unknown cache class {name!r}")
    return cls


def _check_signature(path: Path, saved: dict, model: nn.Module) -> None:
    current = model_signature(model)
    diffs = [
        f"{k}={saved.get(k)!r} in the file, {current.get(k)!r} in the model"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise PromptCacheMismatch(
            f"{path}: this prompt cache was made for a differently configured model: " + "; ".join(diffs)
        )


def _check_shapes(path: Path, cache: list, model: nn.Module) -> None:
    args = model.args
    if len(cache) != args.num_hidden_layers:
        raise PromptCacheError(f"{path}: the cache has {len(cache)} layers, the model {args.num_hidden_layers}")
    for c in cache:
        keys = getattr(c, "keys", None)
        if isinstance(keys, mx.array):
            heads, size = keys.shape[1], keys.shape[3]
        elif isinstance(keys, (tuple, list)) and keys:  # quantized (data, scales, biases): one scale per group
            heads, size = keys[1].shape[1], keys[1].shape[3] * c.group_size
        else:
            continue
        if (heads, size) != (args.num_key_value_heads, args.head_dim):
            raise PromptCacheError(
                f"{path}: cached keys have {heads} heads of size {size}, the model "
                f"{args.num_key_value_heads} of size {args.head_dim}"
            )


def load_prompt_cache(file_name: Union[str, Path], return_metadata: bool = False, model: Optional[nn.Module] = None):
    """Load a prompt cache saved by `save_prompt_cache` (or mlx-lm's).

    With `model`, refuse (PromptCacheError naming the file and the differing settings) a cache
    made for a model with another shape or other long-context settings.
    """
    path = Path(file_name)
    if not path.is_file():
        raise PromptCacheError(f"{path}: no such prompt cache file")
    try:
        arrays, flat_meta = mx.load(str(path), return_metadata=True)
        metadata, classes, scalars = tree_unflatten(list(flat_meta.items()))
    except Exception as e:  # mx.load raises RuntimeError/ValueError on damaged files
        raise PromptCacheError(f"{path}: not a prompt cache file ({e})") from None
    metadata = dict(metadata) if isinstance(metadata, dict) else {}
    signature = metadata.pop(SIGNATURE_KEY, None)
    meta_states = json.loads(metadata.pop(META_STATE_KEY, "[]"))
    if model is not None and signature is not None:
        _check_signature(path, json.loads(signature), model)
    for pos, kind in scalars[1:]:
        value = arrays[pos]
        if kind == "scalar":
            arrays[pos] = value.item()
        elif kind == "string":
            arrays[pos] = "".join(chr(i) for i in value.tolist())
        elif kind == "none":
            arrays[pos] = None
        else:
            raise PromptCacheError(f"{path}: unknown scalar kind {kind!r}")
    states = tree_unflatten(list(arrays.items()))
    cache = [_cache_class(name, path).from_state(state) for name, state in zip(classes, states)]
    for c, meta_state in zip(cache, meta_states):
        if meta_state:
            c.meta_state = tuple(meta_state)
    if model is not None:
        _check_shapes(path, cache, model)
        cache = to_dca_cache(cache, model)  # DCA layers saved within their period in mlx-lm's classes
    return (cache, metadata) if return_metadata else cache


__all__ = [
    "make_prompt_cache",
    "save_prompt_cache",
    "load_prompt_cache",
    "trim_prompt_cache",
    "can_trim_prompt_cache",
    "model_signature",
    "cache_nbytes",
    "PromptCacheError",
]
