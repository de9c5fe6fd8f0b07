"""Finding converted models: what `/model` lists and what `--model` / `/model PATH` accept."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qwen2_mlx.loading.paths import models_dir


def check_model(path: Path) -> Optional[str]:
    """A one-line reason the folder cannot be a model, or None; reads only config.json."""
    from qwen2_mlx import ConfigError, ModelArgs, ModelLoadError
    from qwen2_mlx.loading.loader import resolve_path, weight_files

    try:
        folder = resolve_path(path)
        ModelArgs.from_file(folder / "config.json")
        weight_files(folder)
    except (ModelLoadError, ConfigError, OSError, ValueError) as e:
        return str(e)
    return None


@dataclass
class ModelInfo:
    path: Path
    name: str
    size_gb: float
    kind: str  # "dense" or "MoE"
    precision: str  # "4-bit", "float32", ...


def describe(path: Path) -> Optional[ModelInfo]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9
    kind = "MoE" if config.get("num_experts") or "moe" in str(config.get("model_type", "")) else "dense"
    q = config.get("quantization") or config.get("quantization_config")
    precision = f"{q.get('bits')}-bit" if isinstance(q, dict) and q.get("bits") else str(config.get("torch_dtype", "?"))
    return ModelInfo(path, path.name, size, kind, precision)


def list_models(root: Optional[Path] = None) -> list[ModelInfo]:
    """Model folders (with a config.json) directly under the models folder, by name."""
    root = root or models_dir()
    if not root.is_dir():
        return []
    found = [describe(p) for p in sorted(root.iterdir()) if (p / "config.json").is_file()]
    return [m for m in found if m is not None]


def resolve(target: str, root: Optional[Path] = None) -> Path:
    """A path as given, or the name of a folder under the models folder."""
    path = Path(target).expanduser()
    if not path.exists() and not path.is_absolute():
        candidate = (root or models_dir()) / target
        if candidate.exists():
            return candidate
    return path
