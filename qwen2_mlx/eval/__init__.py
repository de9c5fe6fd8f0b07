"""Long-context evaluation: passkey retrieval, needle-in-a-haystack heatmaps and sliding-window perplexity.

Command line: `python -m qwen2_mlx.eval {passkey,niah,ppl} --help`.
"""

from .niah import plot_heatmap, run_niah
from .passkey import run_passkey
from .ppl import perplexity
from .results import ResultsError, ResultsFile

__all__ = ["run_passkey", "run_niah", "plot_heatmap", "perplexity", "ResultsFile", "ResultsError"]
