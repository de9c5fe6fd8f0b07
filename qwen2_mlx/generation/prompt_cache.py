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
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, QuantizedKVCache, can_trim_prompt_cache, trim_prompt_cache

from qwen2_mlx.models.dca import DCAGeometry, long_context_signature, plain_keys, stored_keys
from qwen2_mlx.models.kv_cache import DCAKVCache, QuantizedDCAKVCache

from .cache_integrity import (
    CHECKSUM_KEY,
    TOKENS_DIGEST_KEY,
    ChecksumWriter,
    IntegrityError,
    check_layers,
    placeholder,
    tokens_digest,
    verify_file,
)

SIGNATURE_KEY = "qwen2_mlx_signature"
META_STATE_KEY = "qwen2_mlx_meta_state"  # per layer; mlx-lm's layout no longer saves it


class PromptCacheError(ValueError):
    """A prompt cache file that cannot be used; the message names the file."""


class PromptCacheMismatch(PromptCacheError):
    """A whole prompt cache made for other settings (e.g. saved before long context was on by default)."""


class CacheIgnored(UserWarning):
    """A chat file's cache was not used (`error` says why); the chat reads its history again instead."""

    def __init__(self, error: PromptCacheError):
        super().__init__(f"{error}; the cache is not used: the next turn reads the history again")
        self.error = error


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
    stage = getattr(getattr(model, "model", None), "stage", None)
    if stage is not None:  # a pipeline rank's cache holds only its own layers
        sig["pipeline_layers"] = [stage.start, stage.end]
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
    # 0600: a cache holds the conversation's token ids, readable as text by anyone who can read the file
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        out = ChecksumWriter(f, head)
        for a in arrays.values():
            if a.size:
                flat = mx.contiguous(a).reshape(-1).view(mx.uint8)
                mx.eval(flat)
                out.write(memoryview(flat))
                del flat
        out.finish()
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
    file_name: Union[str, Path],
    cache: list,
    metadata: Optional[dict] = None,
    model: Optional[nn.Module] = None,
    tokens: Optional[list] = None,
) -> None:
    """Save a prompt cache as safetensors (mlx-lm's layout); with `model`, record its signature.

    `metadata` maps strings to strings (no dots in keys, as in mlx-lm). The file is written to a
    temporary name first, so an interrupted save (or a full disk: the OSError is raised) never
    leaves a half-written cache behind and the previous file stays. It is readable by its owner
    only and carries a checksum over its header and data (cache_integrity.py). With `tokens` (the
    ids the cache holds), their digest is recorded, so `load_prompt_cache(..., tokens=)` can tell
    the file from another cache of the same length.
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
    if tokens is not None:
        meta[TOKENS_DIGEST_KEY] = tokens_digest(tokens)
    meta[CHECKSUM_KEY] = placeholder()  # ChecksumWriter fills it in
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


def load_prompt_cache(
    file_name: Union[str, Path],
    return_metadata: bool = False,
    model: Optional[nn.Module] = None,
    require_checksum: bool = False,
    tokens: Optional[list] = None,
):
    """Load a prompt cache saved by `save_prompt_cache` (or mlx-lm's).

    A file with a checksum is refused when its bytes do not match it (`require_checksum`: a file
    without one is refused too, as mlx-lm's files are). With `model`, refuse (PromptCacheError
    naming the file and what differs) a cache made for a model with other long-context settings,
    or whose layers do not hold the same tokens in the model's dtype and shape. With `tokens`, each
    layer must hold that many, and a file that recorded its tokens' digest must have theirs.
    """
    path = Path(file_name)
    if not path.is_file():
        raise PromptCacheError(f"{path}: no such prompt cache file")
    problem = _verify(path)
    if problem is not None and (require_checksum or "no checksum" not in problem):
        raise PromptCacheError(f"{path}: {problem}")
    try:
        arrays, flat_meta = mx.load(str(path), return_metadata=True)
        metadata, classes, scalars = tree_unflatten(list(flat_meta.items()))
    except Exception as e:  # mx.load raises RuntimeError/ValueError on damaged files
        raise PromptCacheError(f"{path}: not a prompt cache file ({e})") from None
    metadata = dict(metadata) if isinstance(metadata, dict) else {}
    metadata.pop(CHECKSUM_KEY, None)
    digest = metadata.pop(TOKENS_DIGEST_KEY, None)
    if tokens is not None and digest is not None and digest != _digest(path, tokens):
        raise PromptCacheError(f"{path}: it holds other tokens than the ones listed for it")
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
        try:
            check_layers(cache, model, None if tokens is None else len(tokens))
        except IntegrityError as e:
            raise PromptCacheError(f"{path}: {e}") from None
        cache = to_dca_cache(cache, model)  # DCA layers saved within their period in mlx-lm's classes
    return (cache, metadata) if return_metadata else cache


def _digest(path: Path, tokens: list) -> str:
    try:
        return tokens_digest(tokens)
    except (TypeError, ValueError):
        raise PromptCacheError(f"{path}: the token ids listed for it are not integers") from None


def _verify(path: Path) -> Optional[str]:
    try:
        return verify_file(path)
    except OSError as e:
        return f"it cannot be read ({e.strerror or type(e).__name__})"


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
