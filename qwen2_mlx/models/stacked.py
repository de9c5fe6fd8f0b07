"""Linear layers that read the same input, computed by one matmul over their stacked weights.

Attention's q, k and v projections, and the MLP's gate and up projections, each read the same
activations. One matmul over their weights stacked by rows gives every output row as the same dot
product, with one kernel instead of three (or two). At batch 1 a small model's decode step is bound
by its kernel count, not by bandwidth: stacking takes 29 % of the graph nodes of a decode step away.
The results are bitwise equal with MLX's bundled CPU BLAS; OpenBLAS picks kernels by matrix width
(single-row products then differ by ~1e-6) and so may CUDA (float32 logits differ by ~1e-3).
Prefill takes the stacked matmul too (measured on a 2-core CPU, 0.5B in float32: 1.03x, 1.07x and
0.95x the speed of separate matmuls at 128, 512 and 1,024 tokens, within noise), except the MLP's gate and
up above 16 rows: their stacked output held one more intermediate at the prefill's peak (mlp.py).

The members stay the model's modules under the checkpoint's names (`q_proj`, ...), so saving,
`mlx_lm.load` of our folders, `quant_predicate`, `shard()` and `load_weights` see what they always
saw. Once stacked, the members' tensors are views into the stacked ones: no extra memory.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

_TENSORS = ("weight", "scales", "biases", "bias")
_QUANT_ATTRS = ("group_size", "bits", "mode")


def stack_linears(mods: Sequence[nn.Module]) -> Optional[nn.Module]:
    """One linear layer computing `mods` side by side, whose tensors become views into it.

    Returns None (and changes nothing) when they can't be stacked: different layer types,
    quantization settings, tensor sets, dtypes or input sizes (e.g. mlx-lm's mixed-bit recipes,
    which give v_proj more bits than q_proj and k_proj).
    """
    first = mods[0]
    if not hasattr(first, "weight") or any(type(m) is not type(first) or sorted(m) != sorted(first) for m in mods):
        return None
    if any(getattr(m, a, None) != getattr(first, a, None) for m in mods for a in _QUANT_ATTRS):
        return None
    keys = [k for k in _TENSORS if k in first]
    for k in keys:
        if any(m[k].dtype != first[k].dtype or m[k].shape[1:] != first[k].shape[1:] for m in mods):
            return None
    stacked = copy.copy(first)  # same class and settings (quantization, sharding group), new tensors
    for k in keys:
        stacked[k] = mx.concatenate([m[k] for m in mods], axis=0)
    start = 0
    for m in mods:
        n = m["weight"].shape[0]
        for k in keys:
            m[k] = stacked[k][start : start + n]
        start += n
    return stacked


class StackedProjections:
    """The stacked form of some linear children of a module, made again whenever they change.

    A plain object, not an `nn.Module`, so MLX's tree functions (parameters, saving, quantization)
    never see it. Restacking is lazy: it joins the graph of the next forward and costs one copy.
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.layer: Optional[nn.Module] = None
        self.seen: tuple = ()  # the members' weights when stacked: a replaced one means restack

    def refresh(self, owner: nn.Module) -> None:
        mods = [owner[n] for n in self.names]
        self.layer = stack_linears(mods)
        self.seen = tuple(m.get("weight") for m in mods)

    def __call__(self, owner: nn.Module, x: mx.array) -> mx.array:
        """The members' outputs concatenated on the last axis."""
        mods = [owner[n] for n in self.names]
        if len(mods) != len(self.seen) or any(m.get("weight") is not w for m, w in zip(mods, self.seen)):
            self.refresh(owner)  # first call, or load_weights/quantize/shard replaced a member
        if self.layer is None:
            return mx.concatenate([m(x) for m in mods], axis=-1)
        return self.layer(x)


def share_stacks(source: nn.Module, target: nn.Module) -> None:
    """Let `target`, given `source`'s tensors (`target.update(source.parameters())`), use its stacks too.

    Without this `target` would stack a copy of the same weights at its first forward (a model under other
    long-context settings, as the benchmarks build, would hold q/k/v and gate/up twice).
    """
    for (_, a), (_, b) in zip(source.named_modules(), target.named_modules()):
        for name in ("_qkv", "_gate_up"):
            stack = getattr(a, name, None)
            if isinstance(stack, StackedProjections) and isinstance(getattr(b, name, None), StackedProjections):
                shared = copy.copy(stack)  # same stacked layer and views; each model may restack on its own
                setattr(b, name, shared)
