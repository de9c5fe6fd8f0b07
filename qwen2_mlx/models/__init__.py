"""The model code: Qwen2 and Qwen2-MoE modules, their config, RoPE/YaRN, Dual Chunk Attention, sharding.

The lowest layer of the package: it imports MLX and mlx-lm's model pieces, never loading, generation,
chat, tools or command lines (tests/test_layering.py checks it).
"""
