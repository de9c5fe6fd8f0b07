"""qwen2-mlx: Qwen2 dense and MoE models on MLX, with YaRN, Dual Chunk Attention and a chat app."""

from .config import ConfigError, DCAConfig, ModelArgs
from .batch import BatchResponse, batch_generate
from .cache import (PromptCacheError, can_trim_prompt_cache, load_prompt_cache, make_prompt_cache,
                    save_prompt_cache, trim_prompt_cache)
from .chat import Chat, ChatFileError
from .generate import (ContextOverflowError, GenerationResponse, Reply, generate, generate_step,
                       make_logits_processors, make_sampler, prefill_prompt_cache, stream_generate)
from .loader import ModelLoadError, load

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "ModelArgs", "DCAConfig",
           "ConfigError", "ModelLoadError",
           "Chat", "ChatFileError", "Reply", "ContextOverflowError", "generate_step", "batch_generate",
           "BatchResponse", "make_prompt_cache", "save_prompt_cache", "load_prompt_cache", "trim_prompt_cache",
           "can_trim_prompt_cache", "prefill_prompt_cache", "PromptCacheError", "make_sampler",
           "make_logits_processors"]
