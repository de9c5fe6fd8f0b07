"""Kept so that `python -m qwen2_mlx.bench_batch` still runs; the benchmark is `qwen2_mlx/bench/batch.py`."""

import sys

from qwen2_mlx.bench.batch import main

if __name__ == "__main__":
    sys.exit(main())
