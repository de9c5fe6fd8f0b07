"""Real Qwen2 shapes for random-weight benchmark models (plain data: `--help` lists them without MLX)."""

_COMMON = dict(
    hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
    bos_token_id=151643, eos_token_id=151643, sliding_window=32768, use_sliding_window=False,
)
PRESETS: dict[str, dict] = {
    # Qwen/Qwen2-0.5B, Qwen/Qwen2-1.5B, Qwen/Qwen2-7B config.json
    "qwen2-0.5b": dict(_COMMON, model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896,
                       intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(_COMMON, model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=1536,
                       intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-7b": dict(_COMMON, model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=3584,
                     intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                     rope_theta=1000000.0, max_position_embeddings=131072),
    # Qwen/Qwen2-57B-A14B's routing (64 experts, top 8, shared expert, no renorm) at a quarter of its
    # width and 8 of its 28 layers, so it fits a single GPU or a CPU in float32.
    "qwen2-57b-a14b-scaled": dict(_COMMON, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                                  hidden_size=896, intermediate_size=4864, num_hidden_layers=8,
                                  num_attention_heads=7, num_key_value_heads=1, vocab_size=151936,
                                  tie_word_embeddings=False, num_experts=64, num_experts_per_tok=8,
                                  moe_intermediate_size=640, shared_expert_intermediate_size=5120,
                                  norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[]),
}
