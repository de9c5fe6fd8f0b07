"""The scores models' authors published (data/published.json), to set our figures beside.

A folder is matched by its name: `qwen2.5-coder-0.5b-instruct-f32` is Qwen/Qwen2.5-Coder-0.5B-Instruct
(the longest published name the folder name starts with, followed by nothing or a separator), or
named outright with --published-name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .common import EvalError

TABLE = Path(__file__).with_name("data") / "published.json"


def table() -> dict:
    return json.loads(TABLE.read_text(encoding="utf-8"))["models"]


def match(folder_name: str, names) -> Optional[str]:
    """The published model a folder is a copy of, by name; None when none fits."""
    folder = folder_name.lower()
    fits = []
    for name in names:
        base = name.split("/")[-1].lower()
        if folder == base or (folder.startswith(base) and folder[len(base)] in "-_."):
            fits.append(name)
    return max(fits, key=len, default=None)


def lookup(name: Optional[str], benchmark: str, model: Optional[Path]) -> Optional[dict]:
    """{model, score, source} for `benchmark`, by --published-name or else by the model folder's name."""
    models = table()
    if name is not None:
        chosen = next((m for m in models if m.lower() in (name.lower(), f"qwen/{name.lower()}")), None)
        if chosen is None:
            raise EvalError(f"--published-name {name}: not in {TABLE.name}; known: {', '.join(sorted(models))}")
    else:
        from qwen2_mlx.loading.paths import default_model_path

        chosen = match(Path(model or default_model_path()).name, models)
    if chosen is None or benchmark not in models[chosen]:
        return None
    return {"model": chosen, **models[chosen][benchmark]}
