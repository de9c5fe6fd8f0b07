"""Tensor parallelism on mx.distributed: two local ring-backend ranks (started by `mlx.launch`)
must reproduce one process's logits and greedy text, each rank holding 1/N of the split weights."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import DENSE, MOE, make_checkpoint

from qwen2_mlx.generation.generate import generate, generate_step
from qwen2_mlx.loading.loader import load
from qwen2_mlx.models.config import ModelArgs
from qwen2_mlx.models.model import Model
from qwen2_mlx.models.sharding import ShardingError, check_shardable
from qwen2_mlx.runtime.ports import free_ports as _free_ports  # test_serve_distributed imports this name

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
PROMPT = list(range(5, 40))


def mlx_launch(n: int, *command: str, input: str = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `command` on n local ranks with `mlx.launch --backend ring`."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    head = (
        [str(launcher)]
        if launcher.exists()
        else [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OPENBLAS_NUM_THREADS="1"
    )  # two ranks share the two cores of a CI machine
    cmd = head + [
        "-n",
        str(n),
        "--backend",
        "ring",
        "--starting-port",
        str(_free_ports(n)),
        "--",
        sys.executable,
        *command,
    ]
    # The launcher forwards its stdin to every rank: give it the input, or nothing (never pytest's).
    # Its own process group, so a hung run is killed with all its ranks.
    with subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        text=True,
        start_new_session=True,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as p:
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            pytest.fail(f"mlx.launch ran past {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run_sharded(
    paths: list, tmp: Path, n_tokens: int = 8, prompt=PROMPT, ranks: int = 2, parallel: str = "tensor"
) -> list[dict]:
    """Each model's rank-0 results from one launch of `ranks` ranks."""
    args = [str(WORKER), str(tmp), json.dumps(prompt), str(n_tokens), *map(str, paths), "--parallel", parallel]
    r = mlx_launch(ranks, *args)
    outs = [tmp / f"{i}.npz" for i in range(len(paths))]
    assert all(o.exists() for o in outs), f"the ranks failed:\n{r.stdout}\n{r.stderr}"
    return [dict(np.load(o)) for o in outs]


def reference(path: Path, n_tokens: int = 8, prompt=PROMPT):
    model, _ = load(path, dtype=mx.float32)
    tokens = mx.array(prompt, dtype=mx.uint32)
    logits = np.array(model(tokens[None])[0])
    greedy = [t for t, _ in generate_step(tokens, model, max_tokens=n_tokens)]
    return model, logits, greedy


def split_fraction(model: Model) -> tuple[int, int]:
    """(parameters every rank keeps whole, parameters that tensor parallelism splits)."""
    split = 0
    for layer in model.layers:
        mods = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj]
        mlp = layer.mlp
        experts = [mlp] if not hasattr(mlp, "switch_mlp") else [mlp.switch_mlp, mlp.shared_expert]
        for e in experts:
            mods += [e.gate_proj, e.up_proj, e.down_proj]
        split += sum(v.size for m in mods for _, v in tree_flatten(m.parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    return total - split, split


def assert_parity(path: Path, got: dict) -> Model:
    model, ref_logits, ref_greedy = reference(path)
    assert int(got["size"]) == 2
    err = np.abs(got["logits"] - ref_logits).max()
    assert err <= 1e-3, f"max abs logit error {err}"
    assert got["greedy"].tolist() == ref_greedy
    assert got["sampled"][0].tolist() == got["sampled"][1].tolist()  # the ranks stay in step
    # Each rank holds the replicated part plus half of every split matrix.
    whole, split = split_fraction(model)
    assert got["params"].tolist() == [whole + split // 2] * 2
    return model


def quantize_folder(src: Path, dst: Path, group_size: int = 32, bits: int = 4) -> Path:
    """An mlx-lm-style quantized copy of a tiny checkpoint."""
    model, _ = load(src)
    nn.quantize(model, group_size=group_size, bits=bits)
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization"] = {"group_size": group_size, "bits": bits}
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, dst / f.name)
    return dst


def moe_4bit(folder: Path) -> Path:
    """A MoE checkpoint (layer 1 a dense MLP) quantized to 4 bits, its sizes whole 4-bit groups."""
    src, _ = make_checkpoint(
        folder / "moe-src",
        MOE,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        mlp_only_layers=[1],
    )
    return quantize_folder(src, folder / "moe-4bit")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Dense, MoE, 4-bit MoE and DCA checkpoints, and their results on two ranks (one launch for all)."""
    tmp = tmp_path_factory.mktemp("dist")
    dense, _ = make_checkpoint(tmp / "dense", DENSE)
    # Layer 1 is a dense MLP inside a MoE model: both kinds of block get sharded.
    moe, _ = make_checkpoint(tmp / "moe", MOE, mlp_only_layers=[1])
    q4 = moe_4bit(tmp)
    # Dual Chunk Attention with chunks shorter than the prompt: the DCA path runs on sharded heads.
    dca, _ = make_checkpoint(tmp / "dca", DENSE, dual_chunk_attention_config={"chunk_size": 16, "local_size": 4})
    paths = {"dense": dense, "moe": moe, "moe-4bit": q4, "dca": dca}
    results = run_sharded(list(paths.values()), tmp)
    return {k: (p, r) for (k, p), r in zip(paths.items(), results)}


def test_dense_two_ranks_match_one_process(tiny_runs):
    assert_parity(*tiny_runs["dense"])


def test_moe_two_ranks_match_one_process(tiny_runs):
    model = assert_parity(*tiny_runs["moe"])
    assert hasattr(model.layers[0].mlp, "switch_mlp") and not hasattr(model.layers[1].mlp, "switch_mlp")


def test_dca_two_ranks_match_one_process(tiny_runs):
    model = assert_parity(*tiny_runs["dca"])
    assert model.layers[0].self_attn.dca is not None


def test_quantized_moe_two_ranks_match_one_process(tiny_runs):
    model = assert_parity(*tiny_runs["moe-4bit"])
    assert hasattr(model.layers[0].mlp.switch_mlp.down_proj, "scales")
    assert hasattr(model.layers[1].mlp.down_proj, "scales")


class FakeGroup:
    """Enough of mx.distributed.Group for the checks that run before any communication."""

    def __init__(self, n: int):
        self.n = n

    def size(self) -> int:
        return self.n

    def rank(self) -> int:
        return 0


def test_indivisible_heads_give_one_clear_line():
    model = Model(ModelArgs.from_dict(dict(DENSE, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)))
    with pytest.raises(ShardingError) as e:
        model.shard(FakeGroup(2))
    msg = str(e.value)
    assert "\n" not in msg
    assert "num_key_value_heads (3) does not divide by 2 ranks" in msg
    assert "num_attention_heads" not in msg  # 6 heads do divide by 2


def test_indivisible_moe_sizes_are_named():
    model = Model(ModelArgs.from_dict(dict(MOE, moe_intermediate_size=50, shared_expert_intermediate_size=96)))
    with pytest.raises(ShardingError, match=r"moe_intermediate_size \(50\) does not divide by 4 ranks"):
        check_shardable(model, 4)
    with pytest.raises(ShardingError, match=r"shared_expert_intermediate_size \(96\) does not divide by 5 ranks"):
        check_shardable(model, 5)


def test_quantization_groups_must_not_be_cut():
    model = Model(ModelArgs.from_dict(dict(DENSE, intermediate_size=160)))
    nn.quantize(model, group_size=32, bits=4)
    with pytest.raises(
        ShardingError,
        match=r"intermediate_size \(160\) split over 2 ranks gives 80 columns, "
        r"not a multiple of the quantization group size 32",
    ):
        check_shardable(model, 2)
    fine = Model(ModelArgs.from_dict(dict(DENSE, intermediate_size=128)))
    nn.quantize(fine, group_size=32, bits=4)
    check_shardable(fine, 2)  # 64 columns per rank, two whole groups


def test_cli_generates_on_two_ranks_and_rank0_prints(tmp_path):
    path, _ = make_checkpoint(tmp_path / "dense", DENSE)
    model, tok = load(path, dtype=mx.float32)
    want = generate(model, tok, "hello world", max_tokens=8)
    r = mlx_launch(
        2,
        "-m",
        "qwen2_mlx.distributed",
        "--model",
        str(path),
        "--prompt",
        "hello world",
        "--raw",
        "--max-tokens",
        "8",
        "--dtype",
        "float32",
    )
    assert r.stdout == want + "\n", r.stderr


def test_cli_interactive_reads_turns_from_stdin(tmp_path):
    path, _ = make_checkpoint(tmp_path / "dense", DENSE)
    model, tok = load(path, dtype=mx.float32)
    first = [{"role": "user", "content": "hi"}]
    a1 = generate(model, tok, tok.apply_chat_template(first, add_generation_prompt=True), max_tokens=6)
    second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "more"}]
    a2 = generate(model, tok, tok.apply_chat_template(second, add_generation_prompt=True), max_tokens=6)
    r = mlx_launch(
        2,
        "-m",
        "qwen2_mlx.distributed",
        "--model",
        str(path),
        "--interactive",
        "--max-tokens",
        "6",
        "--dtype",
        "float32",
        input="hi\nmore\n\n",
    )
    assert r.stdout == a1 + "\n" + a2 + "\n", r.stderr


def test_cli_indivisible_model_fails_with_one_line(tmp_path):
    path, _ = make_checkpoint(tmp_path / "odd", DENSE, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    r = mlx_launch(2, "-m", "qwen2_mlx.distributed", "--model", str(path), "--prompt", "hi")
    assert "error: cannot shard qwen2 over 2 ranks: num_key_value_heads (3) does not divide by 2 ranks" in r.stderr
    assert "Traceback" not in r.stderr
    assert "exited with code 2" in r.stderr
    assert r.stdout == ""


def real_prompt(path: Path) -> list[int]:
    """The last 30 tokens of a chat prompt for the real model."""
    _, tok = load(path, lazy=True)
    messages = [{"role": "user", "content": "Write a Python function that returns the square of a number."}]
    return tok.apply_chat_template(messages, add_generation_prompt=True)[-30:]


@pytest.mark.real_model
def test_real_model_two_ranks_match_one_process(real_model_path, tmp_path):
    prompt = real_prompt(real_model_path)
    _, ref_logits, ref_greedy = reference(real_model_path, prompt=prompt)
    got = run_sharded([real_model_path], tmp_path, prompt=prompt)[0]
    err = np.abs(got["logits"] - ref_logits).max()
    assert err <= 1e-3, f"max abs logit error {err}"
    assert got["greedy"].tolist() == ref_greedy
    assert got["sampled"][0].tolist() == got["sampled"][1].tolist()
    # Each rank keeps the replicated embeddings and head plus half of the layers' matrices.
    whole, split = split_fraction(load(real_model_path, lazy=True)[0])
    assert got["params"].tolist() == [whole + split // 2] * 2


def test_interactive_chat_in_one_process(tmp_path, monkeypatch, capsys):
    """Without mlx.launch the entry point runs as a group of one; its chat matches plain generation."""
    import io

    from qwen2_mlx.distributed import main

    path, _ = make_checkpoint(tmp_path / "dense", DENSE)
    model, tok = load(path, dtype=mx.float32)
    first = [{"role": "user", "content": "hi"}]
    a1 = generate(model, tok, tok.apply_chat_template(first, add_generation_prompt=True), max_tokens=6)
    second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "more"}]
    a2 = generate(model, tok, tok.apply_chat_template(second, add_generation_prompt=True), max_tokens=6)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nmore\n"))
    assert main(["--model", str(path), "--interactive", "--max-tokens", "6", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == a1 + "\n" + a2 + "\n"


# Qwen2-72B's shapes with one layer (the checks are per layer shape).
Q72 = dict(
    model_type="qwen2",
    hidden_size=8192,
    num_hidden_layers=1,
    intermediate_size=29568,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=152064,
)


@pytest.mark.parametrize(
    "cfg,bits_group,ok,bad",
    [
        # 29568 / 4 = 7392 columns per rank: 115.5 groups of 64, 231 groups of 32.
        (Q72, None, [2, 4, 8], [3]),
        (Q72, 64, [2], [4, 8]),
        (Q72, 32, [2, 4], [8]),
        # Qwen2-57B-A14B: 4 KV heads.
        (
            dict(
                model_type="qwen2_moe",
                hidden_size=3584,
                num_hidden_layers=1,
                intermediate_size=18944,
                num_attention_heads=28,
                num_key_value_heads=4,
                vocab_size=151936,
                num_experts=64,
                num_experts_per_tok=8,
                moe_intermediate_size=2560,
                shared_expert_intermediate_size=20480,
            ),
            64,
            [2, 4],
            [3, 8],
        ),
    ],
)
def test_rank_counts_in_the_readme(cfg, bits_group, ok, bad):
    """The README's table of legal rank counts; the weights stay lazy, so nothing big is allocated."""
    model = Model(ModelArgs.from_dict(cfg))
    if bits_group:
        nn.quantize(model, group_size=bits_group, bits=4)
    for n in ok:
        check_shardable(model, n)
    for n in bad:
        with pytest.raises(ShardingError, match=f"over {n} ranks"):
            check_shardable(model, n)


class RankGroup(FakeGroup):
    """Rank `r` of `n`: enough for shard_linear / shard_inplace, which only slice."""

    def __init__(self, n: int, r: int):
        super().__init__(n)
        self.r = r

    def rank(self) -> int:
        return self.r


@pytest.mark.parametrize("kind", ["dense-f32", "dense-bf16", "moe-4bit"])
def test_slices_read_from_disk_equal_the_sliced_tensors(tmp_path, kind):
    """read_own_slices reads each rank's rows/columns straight from the file: same values as slicing."""
    from qwen2_mlx.loading.loader import weight_files
    from qwen2_mlx.loading.sharded import read_own_slices
    from qwen2_mlx.models.sharding import shard_model

    if kind == "moe-4bit":
        path = moe_4bit(tmp_path)
    else:
        path, _ = make_checkpoint(tmp_path / "src", DENSE)
        if kind == "dense-bf16":
            model, _ = load(path, dtype=mx.bfloat16)
            mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    whole = {k: v.shape for k, v in tree_flatten(load(path, lazy=True)[0].parameters())}
    for r in range(2):
        want, _ = load(path)
        shard_model(want, RankGroup(2, r))
        got, _ = load(path, lazy=True)
        shard_model(got, RankGroup(2, r))
        n = read_own_slices(got, weight_files(path), RankGroup(2, r))
        # Every split tensor (stacked experts and quantization scales included) came from disk.
        assert n == sum(whole[k] != v.shape for k, v in tree_flatten(got.parameters())) > 0
        for (k, a), (_, b) in zip(tree_flatten(got.parameters()), tree_flatten(want.parameters())):
            assert a.dtype == b.dtype and a.shape == b.shape, k
            assert mx.array_equal(a, b).item(), k
