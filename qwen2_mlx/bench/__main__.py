"""`python -m qwen2_mlx.bench`: generation speed against mlx-lm (the code is in compare.py)."""

import sys

from qwen2_mlx.bench.compare import main

if __name__ == "__main__":
    sys.exit(main())
