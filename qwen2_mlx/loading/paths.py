"""Where qwen2-mlx keeps user data: models written by `convert.py` and the chat app's database.

Follows XDG: $XDG_DATA_HOME/qwen2-mlx (default ~/.local/share/qwen2-mlx). The default model is the
folder `python convert.py` (no arguments) writes; the chat app opens it when given no `--model`.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".local" / "share") / "qwen2-mlx"


def models_dir() -> Path:
    return data_dir() / "models"


def default_model_path() -> Path:
    """The folder that the no-argument `python convert.py` writes and `qwen2-chat` opens."""
    return models_dir() / "default"
