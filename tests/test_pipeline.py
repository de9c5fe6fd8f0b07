"""Pipeline parallelism on mx.distributed: ranks started by `mlx.launch --backend ring` each hold a
contiguous slice of the layers and must reproduce one process's logits, greedy tokens (decoded with a
cache, with the prefill whole or in chunks) and batches, on every rank."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from dist_worker import extra_runs
from mlx.utils import tree_flatten
from test_distributed import PROMPT, WORKER, FakeGroup, RankGroup, mlx_launch, moe_4bit, reference
from tiny import DENSE, MOE, make_checkpoint

from qwen2_mlx.generation.batch import batch_generate
from qwen2_mlx.generation.generate import generate
from qwen2_mlx.loading.loader import load
from qwen2_mlx.models.config import ModelArgs
from qwen2_mlx.models.model import Model
from qwen2_mlx.models.pipeline import layer_split
from qwen2_mlx.models.sharding import ShardingError

N_TOKENS = 8


def run_pipelined(n: int, paths: list, tmp: Path) -> list[dict]:
    """Each model's rank-0 results from one n-rank pipeline launch."""
    args = [str(WORKER), str(tmp), json.dumps(PROMPT), str(N_TOKENS), *map(str, paths), "--parallel", "pipeline"]
    r = mlx_launch(n, *args)
    outs = [tmp / f"{i}.npz" for i in range(len(paths))]
    assert all(o.exists() for o in outs), f"the ranks failed:\n{r.stdout}\n{r.stderr}"
    return [dict(np.load(o)) for o in outs]


def layer_params(model: Model) -> tuple[int, list[int]]:
    """(parameters outside the decoder layers, each layer's parameters) of a whole model."""
    per_layer = [sum(v.size for _, v in tree_flatten(layer.parameters())) for layer in model.layers]
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    return total - sum(per_layer), per_layer


def assert_pipeline_parity(path: Path, got: dict, n: int) -> Model:
    model, ref_logits, ref_greedy = reference(path, N_TOKENS)
    assert int(got["size"]) == n
    err = np.abs(got["logits"] - ref_logits).max()
    assert err <= 1e-4, f"max abs logit error {err}"
    assert got["greedy"].tolist() == ref_greedy
    assert got["chunked"].tolist() == ref_greedy
    want = extra_runs(model, mx.array(PROMPT, dtype=mx.uint32), N_TOKENS)
    assert {k: got[k].tolist() for k in want} == {k: v.tolist() for k, v in want.items()}
    assert all(s == got["sampled"][0].tolist() for s in got["sampled"].tolist())  # the ranks stay in step
    _, tok = load(path, lazy=True)
    batch = batch_generate(model, tok, [PROMPT, PROMPT[:12]], max_tokens=N_TOKENS).token_ids
    assert got["batch"].tolist() == [t + [-1] * (N_TOKENS - len(t)) for t in batch]
    # Each rank holds the replicated embeddings, norm and head plus its own layers, and caches only those.
    outside, per_layer = layer_params(model)
    bounds = layer_split(len(per_layer), n)
    assert got["params"].tolist() == [outside + sum(per_layer[a:b]) for a, b in bounds]
    assert got["cache_layers"].tolist() == [b - a for a, b in bounds]
    return model


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Dense, MoE, 4-bit MoE, DCA and YaRN checkpoints, and their results on two ranks (one launch)."""
    tmp = tmp_path_factory.mktemp("pipe")
    paths = {
        # Four layers: two on each rank, so a rank runs more than one layer of the slice; head_dim 32
        # lets the KV cache be quantized in 32-wide groups.
        "dense": make_checkpoint(tmp / "dense", DENSE, num_hidden_layers=4, hidden_size=128)[0],
        # Layer 1 is a dense MLP inside a MoE model: the two ranks hold different kinds of block.
        "moe": make_checkpoint(tmp / "moe", MOE, mlp_only_layers=[1])[0],
        "moe-4bit": moe_4bit(tmp),
        "dca": make_checkpoint(tmp / "dca", DENSE, dual_chunk_attention_config={"chunk_size": 16, "local_size": 4})[0],
        "yarn": make_checkpoint(
            tmp / "yarn",
            DENSE,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        )[0],
    }
    results = run_pipelined(2, list(paths.values()), tmp)
    return {k: (p, r) for (k, p), r in zip(paths.items(), results)}


@pytest.mark.parametrize("kind", ["dense", "moe", "moe-4bit", "dca", "yarn"])
def test_two_ranks_match_one_process(two_rank_runs, kind):
    model = assert_pipeline_parity(*two_rank_runs[kind], n=2)
    if kind == "moe":
        assert hasattr(model.layers[0].mlp, "switch_mlp") and not hasattr(model.layers[1].mlp, "switch_mlp")
    if kind == "dense":
        assert model.args.head_dim == 32  # so the 8-bit KV cache ran too
    if kind == "dca":
        assert model.layers[0].self_attn.dca is not None


def test_three_ranks_uneven_split_match_one_process(tmp_path):
    """Four layers over three ranks: 2, 1 and 1; a middle rank both receives and sends."""
    path, _ = make_checkpoint(tmp_path / "dense", DENSE, num_hidden_layers=4)
    assert_pipeline_parity(path, run_pipelined(3, [path], tmp_path)[0], n=3)


def test_layer_split_is_contiguous_and_even():
    assert layer_split(24, 2) == [(0, 12), (12, 24)]
    assert layer_split(80, 3) == [(0, 27), (27, 54), (54, 80)]
    assert layer_split(4, 3) == [(0, 2), (2, 3), (3, 4)]
    assert layer_split(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ShardingError) as e:
        layer_split(2, 3)
    assert str(e.value) == "cannot pipeline 2 layers over 3 ranks: every rank needs at least one layer"


def test_a_rank_keeps_its_layers_under_their_own_names():
    """Rank 1 of 3 over four layers keeps layer 2 alone; weight names stay the whole model's."""
    model = Model(ModelArgs.from_dict(dict(DENSE, num_hidden_layers=4)))
    model.shard(RankGroup(3, 1), parallel="pipeline")
    layers = {k.split(".")[2] for k, _ in tree_flatten(model.parameters()) if k.startswith("model.layers.")}
    assert layers == {"2"}
    assert len(model.layers) == 1 and len(model.make_cache()) == 1
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names


def test_wrong_splits_give_one_clear_error():
    model = Model(ModelArgs.from_dict(DENSE))
    with pytest.raises(ValueError, match=r'parallel must be "tensor" or "pipeline", not \'pipe\''):
        model.shard(FakeGroup(2), parallel="pipe")
    with pytest.raises(ShardingError, match="cannot pipeline 2 layers over 3 ranks"):
        model.pipeline(RankGroup(3, 0))
    model.pipeline(RankGroup(2, 0))
    with pytest.raises(ShardingError, match="already split"):
        model.pipeline(RankGroup(2, 0))
    tensor = Model(ModelArgs.from_dict(DENSE)).shard(RankGroup(2, 0))
    with pytest.raises(ShardingError, match="already split"):
        tensor.pipeline(RankGroup(2, 0))


def test_a_group_of_one_keeps_the_whole_model():
    model = Model(ModelArgs.from_dict(DENSE))
    assert model.pipeline(FakeGroup(1)) is model
    assert len(model.layers) == DENSE["num_hidden_layers"] and model.model.stage is None


def test_cli_pipeline_generates_on_two_ranks(tmp_path):
    path, _ = make_checkpoint(tmp_path / "dense", DENSE)
    model, tok = load(path, dtype=mx.float32)
    want = generate(model, tok, "hello world", max_tokens=8)
    cmd = ["-m", "qwen2_mlx.distributed", "--model", str(path), "--prompt", "hello world", "--raw"]
    r = mlx_launch(2, *cmd, "--max-tokens", "8", "--dtype", "float32", "--parallel", "pipeline")
    assert r.stdout == want + "\n", r.stderr


def test_cli_more_ranks_than_layers_fails_with_one_line(tmp_path):
    path, _ = make_checkpoint(tmp_path / "dense", DENSE)
    r = mlx_launch(3, "-m", "qwen2_mlx.distributed", "--model", str(path), "--prompt", "hi", "--parallel", "pipeline")
    assert "error: cannot pipeline 2 layers over 3 ranks: every rank needs at least one layer" in r.stderr
    assert "Traceback" not in r.stderr
    assert "exited with code 2" in r.stderr
    assert r.stdout == ""


@pytest.mark.real_model
def test_real_model_two_ranks_match_one_process(real_model_path, tmp_path):
    """Qwen2.5-Coder-0.5B's 24 layers, 12 on each rank: the same logits and tokens as one process."""
    _, tok = load(real_model_path, lazy=True)
    messages = [{"role": "user", "content": "Write a Python function that returns the square of a number."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)[-30:]
    _, ref_logits, ref_greedy = reference(real_model_path, N_TOKENS, prompt=prompt)
    args = [str(WORKER), str(tmp_path), json.dumps(prompt), str(N_TOKENS), str(real_model_path)]
    r = mlx_launch(2, *args, "--parallel", "pipeline")
    assert (tmp_path / "0.npz").exists(), f"the ranks failed:\n{r.stdout}\n{r.stderr}"
    got = dict(np.load(tmp_path / "0.npz"))
    err = np.abs(got["logits"] - ref_logits).max()
    assert err <= 1e-3, f"max abs logit error {err}"
    assert got["greedy"].tolist() == ref_greedy and got["chunked"].tolist() == ref_greedy
    outside, per_layer = layer_params(load(real_model_path, lazy=True)[0])
    assert got["params"].tolist() == [outside + sum(per_layer[:12]), outside + sum(per_layer[12:])]
    assert got["cache_layers"].tolist() == [12, 12]
