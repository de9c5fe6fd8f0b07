"""qwen2-mlx: Qwen2 dense and MoE models on MLX, with YaRN, Dual Chunk Attention and a chat app."""

from .config import ConfigError, DCAConfig, ModelArgs
from .generate import GenerationResponse, generate, stream_generate
from .loader import ModelLoadError, load

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "ModelArgs", "DCAConfig",
           "ConfigError", "ModelLoadError"]
