"""Kept so that `python -m qwen2_mlx.bench_long` still runs; the benchmark is `qwen2_mlx/bench/long.py`."""

import sys

from qwen2_mlx.bench.long import main

if __name__ == "__main__":
    sys.exit(main())
