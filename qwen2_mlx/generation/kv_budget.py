"""`kv_bits="auto"`: a float KV cache that becomes 8-bit once it would pass a memory budget.

The budget is `memory_budget` (bytes, or a size such as "4GB"), else the device's recommended working
set (Metal), else 3/4 of physical memory. The weights come off it first; the tokens that still fit in
a float cache are where the cache switches, through mlx-lm's own rule (`quantized_kv_start`).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

AUTO_BITS = 8  # 4 bits costs a small model real accuracy (docs/long-context.md): auto never picks it
PHYSICAL_FRACTION = 0.75  # of physical memory, where the device gives no working set (a CPU)


def parse_size(value: Union[str, int]) -> int:
    """Bytes of a budget: an integer, or a size as the chat caches' disk budget takes it ("4GB", "500 MB")."""
    from .cache_store import parse_size as parse

    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        try:
            n = parse(value)
        except ValueError as e:
            raise ValueError(f"memory_budget: {e}") from None
    if n <= 0:
        raise ValueError(f"memory_budget must be a positive size such as 4GB, not {value!r}")
    return n


def device_budget() -> int:
    """The memory a process may use: Metal's recommended working set, else a share of physical memory."""
    import mlx.core as mx

    info = {}
    for source in (getattr(mx, "device_info", None), getattr(getattr(mx, "metal", None), "device_info", None)):
        try:
            info = source() if source is not None else {}
        except Exception:  # noqa: BLE001 (a backend without the call: try the next source)
            info = {}
        if info.get("max_recommended_working_set_size"):
            return int(info["max_recommended_working_set_size"])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * PHYSICAL_FRACTION)


def weight_bytes(model: Any) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def float_bytes_per_token(model: Any) -> int:
    """What one token's keys and values take in a float cache of this model (the activations' dtype)."""
    a = model.args
    bias = model.layers[0].self_attn.k_proj.bias  # Qwen2's k_proj has a bias, in the activations' dtype
    return 2 * len(model.layers) * a.num_key_value_heads * a.head_dim * bias.dtype.size


def auto_start(model: Any, memory_budget: Optional[Union[str, int]] = None) -> int:
    """The token count at which the float cache would pass the budget (0: the weights alone pass it)."""
    budget = parse_size(memory_budget) if memory_budget is not None else device_budget()
    return max(0, (budget - weight_bytes(model)) // float_bytes_per_token(model))
