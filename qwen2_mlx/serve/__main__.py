"""`python -m qwen2_mlx.serve`: the same as the `qwen2-serve` command."""

import sys

from qwen2_mlx.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
