"""A pytest plugin that re-runs the test process with OpenBLAS preloaded, as the entry points do.

`pyproject.toml` loads it with `-p`, so it runs while pytest parses its arguments: before output
capture starts and before any test imports MLX. `python -m pytest` then costs what CI's run costs
(16 minutes instead of over 53 for the suite on 2 cores, measured in a fresh venv).
"""

from qwen2_mlx.runtime.blas import ensure_openblas

ensure_openblas()
