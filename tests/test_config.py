"""Config parsing: both rope styles, MoE fields, and one clear error per malformed config."""

import json

import pytest
from tiny import DENSE, MOE

from qwen2_mlx.models.config import ConfigError, ModelArgs, parse_dca


def write(tmp_path, cfg, raw=None):
    p = tmp_path / "config.json"
    p.write_text(raw if raw is not None else json.dumps(cfg))
    return p


def test_dense_defaults(tmp_path):
    args = ModelArgs.from_file(write(tmp_path, DENSE))
    assert args.head_dim == 16 and args.num_key_value_heads == 2
    assert not args.is_moe and args.rope_type == "default"


def test_hub_rope_scaling_type_key(tmp_path):
    cfg = dict(DENSE, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})
    args = ModelArgs.from_file(write(tmp_path, cfg))
    assert args.rope_type == "yarn" and args.rope_scaling["factor"] == 4.0


def test_transformers5_rope_parameters(tmp_path):
    cfg = {k: v for k, v in DENSE.items() if k != "rope_theta"}
    cfg["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 2.0,
        "original_max_position_embeddings": 2048,
    }
    args = ModelArgs.from_file(write(tmp_path, cfg))
    assert args.rope_theta == 1e6
    assert args.rope_type == "yarn" and args.rope_scaling["original_max_position_embeddings"] == 2048


def test_rope_parameters_default_keeps_plain_rope(tmp_path):
    cfg = {k: v for k, v in DENSE.items() if k != "rope_theta"}
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    args = ModelArgs.from_file(write(tmp_path, cfg))
    assert args.rope_theta == 5e5 and args.rope_scaling is None


def test_moe_sparse_layers(tmp_path):
    args = ModelArgs.from_file(
        write(tmp_path, dict(MOE, num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=1))
    )
    assert [args.is_sparse_layer(i) for i in range(4)] == [False, True, True, True]
    args = ModelArgs.from_file(write(tmp_path, dict(MOE, num_hidden_layers=4, decoder_sparse_step=2)))
    assert [args.is_sparse_layer(i) for i in range(4)] == [False, True, False, True]


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda c: c.pop("hidden_size"), "hidden_size", "is missing"),
        (lambda c: c.pop("vocab_size"), "vocab_size", "is missing"),
        (lambda c: c.update(hidden_size="64"), "hidden_size", "must be an integer"),
        (lambda c: c.update(num_hidden_layers=2.5), "num_hidden_layers", "must be an integer"),
        (lambda c: c.update(rms_norm_eps="tiny"), "rms_norm_eps", "must be a number"),
        (lambda c: c.update(tie_word_embeddings="yes"), "tie_word_embeddings", "true or false"),
        (lambda c: c.update(model_type="llama"), "model_type", 'unsupported architecture "llama"'),
        (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads", "does not divide"),
        (lambda c: c.update(rope_scaling={"type": "longrope", "factor": 2}), "rope_scaling.type", "unsupported"),
        (lambda c: c.update(rope_scaling={"type": "yarn"}), "rope_scaling.factor", "positive number"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act", "unsupported activation"),
        (
            lambda c: c.update(dual_chunk_attention_config={"chunk_size": 64, "local_size": 64}),
            "dual_chunk_attention_config.local_size",
            "between",
        ),
    ],
)
def test_config_errors_name_file_and_field(tmp_path, mutate, field, words):
    cfg = dict(DENSE)
    mutate(cfg)
    path = write(tmp_path, cfg)
    with pytest.raises(ConfigError) as exc:
        ModelArgs.from_file(path)
    msg = str(exc.value)
    assert str(path) in msg and f"'{field}'" in msg and words in msg
    assert "\n" not in msg  # one line


def test_unsupported_architecture_named_before_missing_fields(tmp_path):
    with pytest.raises(ConfigError, match='unsupported architecture "llama"'):
        ModelArgs.from_file(write(tmp_path, {"model_type": "llama"}))


def test_moe_missing_expert_field(tmp_path):
    cfg = dict(MOE)
    cfg.pop("num_experts")
    with pytest.raises(ConfigError, match="num_experts"):
        ModelArgs.from_file(write(tmp_path, cfg))


def test_not_json_and_not_object(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelArgs.from_file(write(tmp_path, None, raw="{ nope"))
    with pytest.raises(ConfigError, match="JSON object"):
        ModelArgs.from_file(write(tmp_path, None, raw="[1, 2]"))
    with pytest.raises(ConfigError, match="file not found"):
        ModelArgs.from_file(tmp_path / "missing" / "config.json")


def test_dca_parsing_defaults_and_errors():
    assert parse_dca({"chunk_size": 1024, "local_size": 256}).original_max_position_embeddings == 0
    assert parse_dca({}).chunk_size == 8192  # vLLM's defaults when keys are absent
    with pytest.raises(ConfigError, match="chunk_size"):
        parse_dca({"chunk_size": "big", "local_size": 1})


def test_load_cli_error_is_one_line(tmp_path):
    """The loader surfaces config errors before reading any weight."""
    from qwen2_mlx import load

    cfg = dict(DENSE)
    cfg.pop("num_attention_heads")
    write(tmp_path, cfg)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        load(tmp_path)
