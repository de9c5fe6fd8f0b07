"""qwen2-mlx: Qwen2 dense and MoE models on MLX, with YaRN, Dual Chunk Attention and a chat app.

The public names load on first use (PEP 562), so `import qwen2_mlx` and the command lines' `--help`
answer without importing MLX, and an entry point imports MLX only after its OpenBLAS re-run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load": "qwen2_mlx.loading.loader",
    "ModelLoadError": "qwen2_mlx.loading.loader",
    "ModelArgs": "qwen2_mlx.models.config",
    "DCAConfig": "qwen2_mlx.models.config",
    "ConfigError": "qwen2_mlx.models.config",
    "Model": "qwen2_mlx.models.model",
    "generate": "qwen2_mlx.generation.generate",
    "stream_generate": "qwen2_mlx.generation.generate",
    "generate_step": "qwen2_mlx.generation.generate",
    "GenerationResponse": "qwen2_mlx.generation.generate",
    "Reply": "qwen2_mlx.generation.generate",
    "ContextOverflowError": "qwen2_mlx.generation.generate",
    "make_sampler": "qwen2_mlx.generation.generate",
    "make_logits_processors": "qwen2_mlx.generation.generate",
    "prefill_prompt_cache": "qwen2_mlx.generation.generate",
    "GenerationSettings": "qwen2_mlx.generation.settings",
    "batch_generate": "qwen2_mlx.generation.batch",
    "BatchResponse": "qwen2_mlx.generation.batch",
    "Chat": "qwen2_mlx.generation.chat",
    "ChatFileError": "qwen2_mlx.generation.chat",
    "make_prompt_cache": "qwen2_mlx.generation.prompt_cache",
    "save_prompt_cache": "qwen2_mlx.generation.prompt_cache",
    "load_prompt_cache": "qwen2_mlx.generation.prompt_cache",
    "trim_prompt_cache": "qwen2_mlx.generation.prompt_cache",
    "can_trim_prompt_cache": "qwen2_mlx.generation.prompt_cache",
    "PromptCacheError": "qwen2_mlx.generation.prompt_cache",
    "CacheIgnored": "qwen2_mlx.generation.prompt_cache",
    "CacheStore": "qwen2_mlx.generation.cache_store",
    "read_attachment": "qwen2_mlx.generation.attachments",
    "AttachmentError": "qwen2_mlx.generation.attachments",
    "display_stream": "qwen2_mlx.generation.notebook",
    "LookupSettings": "qwen2_mlx.generation.proposers",
    "default_model_path": "qwen2_mlx.loading.paths",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen2_mlx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # for type checkers and editors: the names as plain imports
    from qwen2_mlx.generation.attachments import AttachmentError, read_attachment
    from qwen2_mlx.generation.batch import BatchResponse, batch_generate
    from qwen2_mlx.generation.cache_store import CacheStore
    from qwen2_mlx.generation.chat import Chat, ChatFileError
    from qwen2_mlx.generation.generate import (
        ContextOverflowError,
        GenerationResponse,
        Reply,
        generate,
        generate_step,
        make_logits_processors,
        make_sampler,
        prefill_prompt_cache,
        stream_generate,
    )
    from qwen2_mlx.generation.notebook import display_stream
    from qwen2_mlx.generation.prompt_cache import (
        CacheIgnored,
        PromptCacheError,
        can_trim_prompt_cache,
        load_prompt_cache,
        make_prompt_cache,
        save_prompt_cache,
        trim_prompt_cache,
    )
    from qwen2_mlx.generation.proposers import LookupSettings
    from qwen2_mlx.generation.settings import GenerationSettings
    from qwen2_mlx.loading.loader import ModelLoadError, load
    from qwen2_mlx.loading.paths import default_model_path
    from qwen2_mlx.models.config import ConfigError, DCAConfig, ModelArgs
    from qwen2_mlx.models.model import Model
