"""qwen2-chat: a Textual terminal chat app that runs Qwen2 models in-process with MLX."""

from .app import ChatApp

__all__ = ["ChatApp"]
