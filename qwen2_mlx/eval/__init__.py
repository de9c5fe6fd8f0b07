"""Long-context evaluation: passkey retrieval, needle-in-a-haystack heatmaps and sliding-window perplexity.

Command line: `python -m qwen2_mlx.eval {passkey,niah,ppl} --help`. The names below load on first
use, so the command line's `--help` imports neither MLX nor matplotlib.
"""

import importlib

_EXPORTS = {
    "run_passkey": "passkey",
    "run_niah": "niah",
    "plot_heatmap": "niah",
    "perplexity": "ppl",
    "ResultsFile": "results",
    "ResultsError": "results",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qwen2_mlx.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
