"""`python convert.py [options]`: see `python convert.py --help` (same as the `qwen2-convert` command)."""

from qwen2_mlx.convert.cli import main

if __name__ == "__main__":
    main()
