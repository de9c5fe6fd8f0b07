"""KV caches for generation.

The model decides which cache each layer gets (`model.make_cache()`); callers only ask for one here.
"""

from __future__ import annotations

import mlx.nn as nn


def make_prompt_cache(model: nn.Module) -> list:
    """One KV cache per layer, as the model wants them."""
    return model.make_cache()
