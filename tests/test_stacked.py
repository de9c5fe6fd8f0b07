"""One forward pass: q/k/v and gate/up as single matmuls over stacked weights (models/stacked.py).

The stacked `Attention` and `MLP` are compared with an unfused reference written here (separate
projections, separate RoPE calls); the checkpoint-named tensors stay what they were (names, values,
saving, quantization, reloads); the real model's greedy tokens equal those recorded before the change.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import scaled_dot_product_attention
from tiny import DENSE, MOE, make_checkpoint

import qwen2_mlx
from qwen2_mlx.generation.generate import generate_step
from qwen2_mlx.generation.prompt_cache import make_prompt_cache
from qwen2_mlx.models.stacked import stack_linears

PROMPT = mx.array([5, 17, 33, 2, 9, 100, 200, 7, 64], dtype=mx.uint32)
# Each stacked output row is the same dot product as before: bitwise equal with MLX's bundled BLAS.
# OpenBLAS picks kernels by matrix width, so single-row products may differ in the last bits (~1e-6
# measured); CUDA may pick another kernel for the stacked shape (float32 logits then differ by ~1e-3).
ON_CPU = mx.default_device().type == mx.cpu


def same(a: mx.array, b: mx.array) -> bool:
    tol = 1e-5 if ON_CPU else 5e-3
    return mx.allclose(a, b, atol=tol, rtol=tol).item()


def unfused_attention(attn, x, cache=None):
    """Qwen2 attention the way the model computed it before stacking: three matmuls, two RoPE calls."""
    B, L, _ = x.shape
    q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    offset = cache.offset if cache is not None else 0
    q, k = attn.rope(q, offset=offset), attn.rope(k, offset=offset)
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    mask = "causal" if L > 1 else None
    out = scaled_dot_product_attention(q, k, v, cache=cache, scale=attn.scale, mask=mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def unfused_mlp(mlp, x):
    return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


@pytest.fixture(scope="module", params=["dense", "moe"])
def tiny_model(request, tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp(request.param), DENSE if request.param == "dense" else MOE)
    model, _ = qwen2_mlx.load(path)
    return model


def test_stacked_attention_and_mlp_equal_the_unfused_reference(tiny_model):
    x = mx.random.normal((2, 7, tiny_model.args.hidden_size), key=mx.random.key(1))
    layer = tiny_model.layers[0]
    attn = layer.self_attn
    assert attn._qkv.layer is not None  # stacked at load
    assert same(attn(x, "causal"), unfused_attention(attn, x))
    mlp = layer.mlp if hasattr(layer.mlp, "gate_proj") else layer.mlp.shared_expert
    assert mlp._gate_up.layer is not None
    assert same(mlp(x), unfused_mlp(mlp, x))


def test_decode_with_a_cache_equals_the_unfused_reference(tiny_model):
    """Prefill then single tokens (the decode step) through the same cache type, stacked and not."""
    attn = tiny_model.layers[1].self_attn
    caches = [make_prompt_cache(tiny_model)[0] for _ in range(2)]
    xs = mx.random.normal((1, 12, tiny_model.args.hidden_size), key=mx.random.key(2))
    for fused_out, ref_out in [
        (attn(xs[:, :9], "causal", caches[0]), unfused_attention(attn, xs[:, :9], caches[1]))
    ] + [
        (attn(xs[:, i : i + 1], None, caches[0]), unfused_attention(attn, xs[:, i : i + 1], caches[1]))
        for i in range(9, 12)
    ]:
        assert same(fused_out, ref_out)
    assert caches[0].offset == caches[1].offset == 12
    assert same(caches[0].keys[..., :12, :], caches[1].keys[..., :12, :])


def test_checkpoint_names_and_values_unchanged_and_no_second_copy(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", DENSE)
    stored = mx.load(str(path / "model.safetensors"))
    mx.eval(stored)
    before = mx.get_active_memory()  # other tests of this process may hold models: measure the difference
    model, _ = qwen2_mlx.load(path)
    params = dict(tree_flatten(model.parameters()))
    # Only the checkpoint's names (no stacked tensor among the parameters), with the stored values.
    assert set(params) == set(model.sanitize(dict(stored)))
    assert all(mx.array_equal(params[k], stored[k]).item() for k in params)
    attn = model.layers[0].self_attn
    stacked = attn._qkv.layer["weight"]
    assert stacked.shape[0] == sum(attn[n].weight.shape[0] for n in ("q_proj", "k_proj", "v_proj"))
    # The module tensors are views: the active memory is about one copy of the weights, not two.
    mx.eval(model.parameters())
    total = sum(v.nbytes for v in params.values())
    assert mx.get_active_memory() - before < 1.5 * total + (8 << 20)


def test_saved_weights_reload_in_our_model_and_mlx_lm(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", DENSE)
    model, _ = qwen2_mlx.load(path)
    model(PROMPT[None])  # stacked and used
    mx.save_safetensors(str(tmp_path / "saved.safetensors"), dict(tree_flatten(model.parameters())))
    saved = mx.load(str(tmp_path / "saved.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in saved and not any("_qkv" in k for k in saved)
    from mlx_lm.models import qwen2 as mlx_lm_qwen2

    ref = mlx_lm_qwen2.Model(mlx_lm_qwen2.ModelArgs.from_dict(json.loads((path / "config.json").read_text())))
    ref.load_weights(list(saved.items()), strict=True)
    assert mx.allclose(ref(PROMPT[None]), model(PROMPT[None]), atol=1e-4).item()


def test_reloaded_weights_are_used_not_a_stale_stack(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", DENSE)
    model, _ = qwen2_mlx.load(path)
    before = model(PROMPT[None])
    halved = [(k, v * 0.5) for k, v in tree_flatten(model.parameters()) if "self_attn" in k or ".mlp." in k]
    model.load_weights(halved, strict=False)
    after = model(PROMPT[None])
    assert not mx.allclose(before, after).item()
    attn = model.layers[0].self_attn
    x = mx.random.normal((1, 5, model.args.hidden_size), key=mx.random.key(3))
    assert same(attn(x, "causal"), unfused_attention(attn, x))
    assert same(model.layers[0].mlp(x), unfused_mlp(model.layers[0].mlp, x))


def test_quantized_weights_stack_and_mixed_bits_fall_back(tmp_path):
    # head_dim 32: the smallest group size mx.quantize takes.
    path, _ = make_checkpoint(tmp_path / "m", DENSE, num_attention_heads=2, num_key_value_heads=1)
    model, _ = qwen2_mlx.load(path)
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda p, m: (
            {"group_size": 32, "bits": 8} if p.endswith("v_proj") else hasattr(m, "to_quantized")
        ),
    )
    x = mx.random.normal((1, 6, model.args.hidden_size), key=mx.random.key(4))
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert same(attn(x, "causal"), unfused_attention(attn, x))
    assert same(mlp(x), unfused_mlp(mlp, x))
    assert attn._qkv.layer is None  # v_proj has 8 bits, q/k 4: computed separately
    assert isinstance(mlp._gate_up.layer, nn.QuantizedLinear)  # gate and up agree: stacked
    assert stack_linears([attn.q_proj, attn.k_proj]) is not None


def test_greedy_tokens_and_logprobs_equal_the_unfused_forward(tiny_model, monkeypatch):
    """300 tokens (past KVCache's 256-position growth) with the stacked and an unfused forward."""

    def run():
        return [(t, lp) for t, lp in generate_step(PROMPT, tiny_model, max_tokens=300)]

    fused = run()
    from qwen2_mlx.models import attention, mlp

    monkeypatch.setattr(
        attention.Attention, "__call__", lambda self, x, mask=None, cache=None: unfused_attention(self, x, cache)
    )
    monkeypatch.setattr(mlp.MLP, "__call__", unfused_mlp)
    ref = run()
    assert [t for t, _ in fused] == [t for t, _ in ref]
    assert len({t for t, _ in ref}) > 5  # a degenerate repetition would prove little
    assert same(mx.stack([lp for _, lp in fused]), mx.stack([lp for _, lp in ref]))


@pytest.mark.real_model
def test_real_model_greedy_tokens_as_before_the_change(real_model):
    """The tokens recorded with the two-forward code (commit ee8c104) for an English and a Chinese prompt."""
    model, tokenizer = real_model
    recorded = json.loads((Path(__file__).parent / "data" / "real_greedy_before_one_forward.json").read_text())
    for name, case in recorded.items():
        ids = tokenizer.apply_chat_template(case["messages"], add_generation_prompt=True)
        tokens = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=len(case["tokens"]))]
        assert tokens == case["tokens"], name


def test_loading_holds_at_most_one_layer_twice(tmp_path):
    """Stacking reads each layer into new buffers; the files' tensors must be freed layer by layer."""
    from qwen2_mlx.models.config import ModelArgs
    from qwen2_mlx.models.model import Model

    cfg = dict(
        DENSE,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = Model(ModelArgs.from_dict(cfg))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    total = sum(v.nbytes for v in weights.values())
    layer = sum(v.nbytes for k, v in weights.items() if k.startswith("model.layers.0."))
    del model, weights
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    from qwen2_mlx.loading.loader import load_model

    loaded = load_model(tmp_path)
    assert loaded.layers[0].self_attn._qkv.layer is not None
    assert mx.get_peak_memory() - before <= total + 2 * layer, (mx.get_peak_memory() - before, total, layer)


def test_a_twin_shares_the_stacks_and_restacks_alone(tmp_path):
    """A model built on another's tensors (other long-context settings) shares its stacks, no second copy."""
    from dataclasses import replace

    from qwen2_mlx.models.config import DCAConfig
    from qwen2_mlx.models.model import Model
    from qwen2_mlx.models.stacked import share_stacks

    path, _ = make_checkpoint(tmp_path / "m", DENSE)
    model, _ = qwen2_mlx.load(path)
    twin = Model(replace(model.args, dual_chunk_attention_config=DCAConfig(64, 16, 0)))
    twin.update(model.parameters())
    share_stacks(model, twin)
    out = twin(PROMPT[None])  # shorter than a chunk: DCA is plain attention, so the outputs agree
    mx.eval(out)
    # The same stacked tensors, not a copy (a copy would be another layer object).
    assert twin.layers[0].self_attn._qkv.layer is model.layers[0].self_attn._qkv.layer
    assert twin.layers[0].mlp._gate_up.layer is model.layers[0].mlp._gate_up.layer
    assert same(out, model(PROMPT[None]))
    # New weights in the twin restack the twin only.
    twin.load_weights([(k, v * 0.5) for k, v in tree_flatten(twin.parameters()) if "self_attn" in k], strict=False)
    assert not same(twin(PROMPT[None]), model(PROMPT[None]))
    assert twin.layers[0].self_attn._qkv.layer is not model.layers[0].self_attn._qkv.layer
    x = mx.random.normal((1, 5, model.args.hidden_size), key=mx.random.key(5))
    assert same(model.layers[0].self_attn(x, "causal"), unfused_attention(model.layers[0].self_attn, x))
