"""Converting tiny checkpoint folders: float parity, quantized outputs, recipes, MoE gates, shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import DENSE, MOE, make_checkpoint


def run_cli(*argv) -> int:
    from qwen2_mlx.convert.cli import run

    return run([str(a) for a in argv])


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("dense") / "hf", DENSE, hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("moe") / "hf",
        MOE,
        hidden_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        num_hidden_layers=3,
    )


IDS = [[1, 17, 300, 42, 99, 7, 255, 3, 128, 64, 511, 2, 77, 5, 400, 9]]


def _torch_logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor(IDS)).logits[0].numpy()


def _mlx_logits(path: Path, loader: str = "qwen2_mlx"):
    import mlx.core as mx

    if loader == "mlx_lm":
        import mlx_lm

        model, _ = mlx_lm.load(str(path))
    else:
        import qwen2_mlx

        model, _ = qwen2_mlx.load(path)
    return np.array(model(mx.array(IDS))[0].astype(mx.float32))


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_float_conversion_matches_transformers(tmp_path, which, request, capsys):
    ckpt, torch_model = request.getfixturevalue(which)
    out = tmp_path / "out"
    assert run_cli("--hf-path", ckpt, "--mlx-path", out, "--dtype", "float32") == 0
    printed = capsys.readouterr().out
    assert "32.000 bits per weight" in printed and "on disk" in printed
    ref = _torch_logits(torch_model)
    for loader in ("qwen2_mlx", "mlx_lm"):
        assert np.abs(_mlx_logits(out, loader) - ref).max() < 1e-4
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (ckpt / name).read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and cfg["torch_dtype"] == "float32"


@pytest.mark.parametrize("bits,tol", [(8, 0.05), (4, 0.6)])
def test_quantized_conversion_loads_in_both_loaders(tmp_path, dense, bits, tol, capsys):
    ckpt, torch_model = dense
    out = tmp_path / "out"
    assert run_cli("--hf-path", ckpt, "--mlx-path", out, "-q", "--q-bits", bits, "--dtype", "float32") == 0
    printed = capsys.readouterr().out
    bpw = float(printed.split(" bits per weight")[0].split()[-1])
    assert bpw < 32
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}
    assert cfg["quantization_config"] == cfg["quantization"]
    ref = _torch_logits(torch_model)
    ours = _mlx_logits(out)
    theirs = _mlx_logits(out, "mlx_lm")
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < tol, rel


def test_mixed_recipe_records_per_layer_bits(tmp_path, dense):
    ckpt, _ = dense
    out = tmp_path / "out"
    assert run_cli("--hf-path", ckpt, "--mlx-path", out, "-q", "--quant-predicate", "mixed_3_6") == 0
    q = json.loads((out / "config.json").read_text())["quantization"]
    # mlx-lm's rule for 2 layers: the last layer's v_proj/down_proj and lm_head get 6 bits, the rest 3.
    assert q["lm_head"]["bits"] == 6 and q["model.layers.1.mlp.down_proj"]["bits"] == 6
    assert q["model.layers.0.mlp.down_proj"]["bits"] == 3 and q["model.layers.0.self_attn.q_proj"]["bits"] == 3
    import mlx_lm

    model, _ = mlx_lm.load(str(out))
    assert model.model.layers[0].self_attn.q_proj.bits == 3 and model.lm_head.bits == 6
    import qwen2_mlx

    model, _ = qwen2_mlx.load(out)
    assert model.model.layers[1].mlp.down_proj.bits == 6


def test_moe_gates_stay_at_8_bits(tmp_path, moe):
    ckpt, _ = moe
    out = tmp_path / "out"
    assert run_cli("--hf-path", ckpt, "--mlx-path", out, "-q", "--q-bits", "4") == 0
    q = json.loads((out / "config.json").read_text())["quantization"]
    for i in range(MOE["num_hidden_layers"]):
        assert q[f"model.layers.{i}.mlp.gate"] == {"group_size": 64, "bits": 8, "mode": "affine"}
        assert q[f"model.layers.{i}.mlp.shared_expert_gate"]["bits"] == 8
    import mlx_lm

    import qwen2_mlx

    for model in (mlx_lm.load(str(out))[0], qwen2_mlx.load(out)[0]):
        mlp = model.model.layers[1].mlp
        assert mlp.gate.bits == 8 and mlp.shared_expert_gate.bits == 8 and mlp.switch_mlp.up_proj.bits == 4


def _routing_agreement(float_model, quant_model, ids) -> float:
    """Fraction of (token, layer) pairs whose top-k expert set equals the float model's, on the same input."""
    import mlx.core as mx

    h = float_model.model.embed_tokens(mx.array(ids))
    from mlx_lm.models.base import create_attention_mask

    mask = create_attention_mask(h, None)
    same, total = 0, 0
    for lf, lq in zip(float_model.model.layers, quant_model.model.layers):
        x = lf.post_attention_layernorm(h + lf.self_attn(lf.input_layernorm(h), mask, None))
        a = np.sort(np.array(lf.mlp.route(x)[0]), axis=-1)
        b = np.sort(np.array(lq.mlp.route(x)[0]), axis=-1)
        same += int((a == b).all(axis=-1).sum())
        total += a.shape[0] * a.shape[1]
        h = lf(h, mask, None)
    return same / total


def test_routing_agreement_8bit_gates_vs_4bit(tmp_path, moe, monkeypatch, capsys):
    import qwen2_mlx
    from qwen2_mlx.models.model import Model

    ckpt, _ = moe
    run_cli("--hf-path", ckpt, "--mlx-path", tmp_path / "f32", "--dtype", "float32")
    assert run_cli("--hf-path", ckpt, "--mlx-path", tmp_path / "g8", "-q", "--dtype", "float32") == 0
    # mlx-lm's behaviour: the router quantized like every other layer.
    monkeypatch.setattr(Model, "quant_predicate", property(lambda self: lambda p, m: True))
    assert run_cli("--hf-path", ckpt, "--mlx-path", tmp_path / "g4", "-q", "--dtype", "float32") == 0
    monkeypatch.undo()
    q4 = json.loads((tmp_path / "g4" / "config.json").read_text())["quantization"]
    assert "model.layers.0.mlp.gate" not in q4  # really at 4 bits

    ref = qwen2_mlx.load(tmp_path / "f32")[0]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, MOE["vocab_size"], size=(4, 128)).tolist()
    agree8 = _routing_agreement(ref, qwen2_mlx.load(tmp_path / "g8")[0], ids)
    agree4 = _routing_agreement(ref, qwen2_mlx.load(tmp_path / "g4")[0], ids)
    with capsys.disabled():
        print(
            f"\nrouting agreement with float32 (top-{MOE['num_experts_per_tok']} expert sets, "
            f"{len(ids) * len(ids[0])} tokens x {len(ref.model.layers)} layers): "
            f"gates at 8 bits {agree8:.1%}, gates at 4 bits {agree4:.1%}"
        )
    assert agree8 >= agree4
    assert agree8 >= 0.95


def test_sharded_output_and_index(tmp_path, dense):
    ckpt, torch_model = dense
    out = tmp_path / "out"
    assert run_cli("--hf-path", ckpt, "--mlx-path", out, "--dtype", "float32", "--max-shard-size", "200KB") == 0
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert all(s.stat().st_size <= 200_000 + 300_000 for s in shards)  # one tensor may exceed the limit alone
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert np.abs(_mlx_logits(out, "mlx_lm") - _torch_logits(torch_model)).max() < 1e-4
    # A sharded source converts too (and dequantize round trip of a quantized MLX folder).
    q = tmp_path / "q"
    assert run_cli("--hf-path", out, "--mlx-path", q, "-q", "--q-bits", "8", "--max-shard-size", "100KB") == 0
    dq = tmp_path / "dq"
    assert run_cli("--hf-path", q, "--mlx-path", dq, "-d") == 0
    assert "quantization" not in json.loads((dq / "config.json").read_text())
    np.testing.assert_allclose(_mlx_logits(dq), _mlx_logits(q), atol=1e-4)


def test_gguf_to_quantized(tmp_path, dense):
    from tiny_gguf import write_gguf

    ckpt, _ = dense
    gguf_path = write_gguf(tmp_path / "t.gguf", ckpt, dict(DENSE, hidden_size=128, intermediate_size=256))
    out = tmp_path / "out"
    assert run_cli("--gguf", gguf_path, "--mlx-path", out, "-q") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["torch_dtype"] == "float16"
    import mlx_lm

    mlx_lm.load(str(out))
