"""Load a model folder split over the ranks of `mx.distributed`: each rank reads only its own slices."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .loader import materialize

# safetensors dtypes numpy can memory-map (bfloat16 as its raw 16 bits, reinterpreted by MLX).
_NP_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "U32": np.uint32,
    "I32": np.int32,
    "U16": np.uint16,
    "I16": np.int16,
    "U8": np.uint8,
    "I8": np.int8,
    "I64": np.int64,
    "U64": np.uint64,
}


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


def sharded_load(
    path: Union[str, Path],
    group: Optional[mx.distributed.Group] = None,
    *,
    dtype: Optional[mx.Dtype] = None,
    dca: Optional[dict] = None,
    rope_scaling: Optional[dict] = None,
    long_context: Optional[str] = "auto",
    max_context: Optional[int] = None,
    parallel: str = "tensor",
):
    """Load a model folder split over `group`. Returns (model, tokenizer).

    `parallel="tensor"`: each rank reads only its slice of every split tensor from disk
    (`read_own_slices`); tensors that `sanitize` has to rebuild are read lazily and sliced before
    evaluation, one layer at a time. So each rank keeps only its shard plus the replicated
    embeddings, norms and router. `parallel="pipeline"`: each rank keeps a contiguous slice of the
    layers plus the replicated embeddings, norm and head; the other layers are dropped while still
    lazy, so their tensors are never read.
    A model that does not split over the ranks fails before any weight is read. `dca`,
    `rope_scaling`, `long_context` and `max_context` are `load`'s long-context settings.
    """
    from qwen2_mlx.loading.loader import load, resolve_path, weight_files

    if parallel not in ("tensor", "pipeline"):
        raise ValueError(f'parallel must be "tensor" or "pipeline", not {parallel!r}')
    group = group or mx.distributed.init()
    model, tokenizer = load(
        path,
        dca=dca,
        lazy=True,
        dtype=dtype,
        rope_scaling=rope_scaling,
        long_context=long_context,
        max_context=max_context,
    )
    model.shard(group, parallel=parallel)
    if parallel == "tensor" and group.size() > 1:
        read_own_slices(model, weight_files(resolve_path(path)), group)
        model.stack_projections()  # over the slices just read
    materialize(model)
    # A barrier, so no rank starts a collective while another is still reading its weights.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model, tokenizer
