"""Benchmarks: `python -m qwen2_mlx.bench` (against mlx-lm), `.long` (DCA against plain), `.batch`."""
