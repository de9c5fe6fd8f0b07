"""The benchmark (bench.py) and its random real-shape model folders (random_model.py)."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import qwen2_mlx
from qwen2_mlx.bench import compare as bench
from qwen2_mlx.bench.random_model import PRESETS, tensor_shapes, write_random_model

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
)
TINY = dict(PRESETS["qwen2-0.5b"], **SMALL)
TINY_MOE = dict(
    PRESETS["qwen2-57b-a14b-scaled"],
    **SMALL,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
)


@pytest.mark.parametrize(
    "preset,params", [("qwen2-0.5b", 494_032_768), ("qwen2-1.5b", 1_543_714_304), ("qwen2-7b", 7_615_616_512)]
)
def test_presets_have_the_released_parameter_counts(preset, params):
    assert sum(math.prod(s) for s in tensor_shapes(PRESETS[preset]).values()) == params


@pytest.mark.parametrize("cfg", [TINY, TINY_MOE], ids=["dense", "moe"])
def test_random_folder_loads_in_both_libraries(tmp_path, monkeypatch, cfg):
    import mlx_lm

    monkeypatch.setitem(PRESETS, "tiny-test", cfg)
    path = write_random_model("tiny-test", tmp_path / "m", mx.float32)
    ours, tok = qwen2_mlx.load(path)
    theirs, _ = mlx_lm.load(str(path))
    x = mx.array([[1, 2, 3, 4, 5]])
    a, b = ours(x), theirs(x)
    assert a.shape == (1, 5, 300)
    assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()
    assert float(a.std()) > 0.1  # realistic scales, not near-constant logits
    assert tok.decode(tok.encode("héllo 你好")) == "héllo 你好"
    mtime = (path / "config.json").stat().st_mtime_ns
    assert write_random_model("tiny-test", path, mx.float32) == path  # reused, not rewritten
    assert (path / "config.json").stat().st_mtime_ns == mtime
    assert not (tmp_path / "m.partial").exists()


def test_weight_bytes_counts_only_routed_experts(tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny-moe", TINY_MOE)
    model, _ = qwen2_mlx.load(write_random_model("tiny-moe", tmp_path / "m", mx.float32))
    total, per_token = bench.weight_bytes(model, model.args)
    experts = 2 * 3 * 8 * 32 * 64 * 4  # layers x (gate, up, down) x E x I x H x float32
    embed_rest = 300 * 64 * 4 - 64 * 4  # untied: one embedding row is read
    assert total - per_token == experts * (1 - 2 / 8) + embed_rest


def test_bench_end_to_end_against_mlx_lm(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "tiny-test", TINY)
    out = tmp_path / "out.json"
    rc = bench.main(
        [
            "--random",
            "tiny-test",
            "--random-dir",
            str(tmp_path),
            "--dtype",  # the figures below are float32's on any device (--random's default is bfloat16 on a GPU)
            "float32",
            "--compare-mlx-lm",
            "--prompt-tokens",
            "12",
            "--gen-tokens",
            "6",
            "--runs",
            "2",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["median"]) == {"qwen2_mlx", "mlx_lm"}
    assert len(res["per_run"]["qwen2_mlx"]) == 2 and len(res["per_run"]["mlx_lm"]) == 2
    for m in res["median"].values():
        assert m["prefill_tps"] > 0 and m["decode_tps"] > 0 and m["ttft_s"] > 0 and m["peak_memory_gb"] > 0
    assert res["greedy_tokens_match_mlx_lm"] is True  # same float32 weights, same greedy tokens
    assert res["ratio_ours_over_mlx_lm"]["decode_tps"] == pytest.approx(
        res["median"]["qwen2_mlx"]["decode_tps"] / res["median"]["mlx_lm"]["decode_tps"]
    )
    assert set(res["paired_ratio_median"]) == {"prefill_tps", "decode_tps"}
    roof = res["roofline"]
    assert roof["copy_bandwidth_gbs"] > 0 and roof["matvec_bandwidth_gbs"] > 0
    assert roof["bandwidth_gbs"] == max(roof["copy_bandwidth_gbs"], roof["matvec_bandwidth_gbs"])
    assert 0 < roof["fraction"]["qwen2_mlx"]
    assert roof["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4 * (12 + 6 / 2)
    printed = capsys.readouterr().out
    assert "ours/mlx-lm" in printed and "roofline" in printed


def test_both_libraries_share_one_copy_of_the_weights(tmp_path, monkeypatch):
    import mlx_lm

    monkeypatch.setitem(PRESETS, "tiny-test", TINY)
    path = write_random_model("tiny-test", tmp_path / "m", mx.float32)
    seen = {}
    real_load = mlx_lm.load
    monkeypatch.setattr(mlx_lm, "load", lambda *a, **k: seen.setdefault("m", real_load(*a, **k)))
    ours = {}
    real_ours = qwen2_mlx.load
    monkeypatch.setattr(qwen2_mlx, "load", lambda *a, **k: ours.setdefault("m", real_ours(*a, **k)))
    bench.run_benchmark(
        bench.parse_args(
            ["--model", str(path), "--compare-mlx-lm", "--runs", "1", "--prompt-tokens", "4", "--gen-tokens", "2"]
        )
    )
    theirs_params = dict(tree_flatten(seen["m"][0].parameters()))
    ours_params = dict(tree_flatten(ours["m"][0].parameters()))
    # The embedding is never restacked: the very same array sits in both models.
    assert theirs_params["model.embed_tokens.weight"] is ours_params["model.embed_tokens.weight"]


def test_bench_rejects_bad_input(tmp_path, capsys):
    assert bench.main(["--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{")
    assert bench.main(["--model", str(tmp_path / "bad")]) == 2
    assert "config.json" in capsys.readouterr().err
    for argv in (
        ["--random", "qwen2-0.5b", "--gen-tokens", "1"],
        ["--random", "nope"],
        ["--random", "qwen2-0.5b", "--dca-local-size", "4"],
    ):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2


def test_beyond_window_rows_side_by_side(tmp_path_factory, tmp_path, capsys):
    # The tiny model's trained window is 4,096: a 5,000-token prompt passes it.
    from api_support import tiny_model

    from qwen2_mlx.bench import beyond_window

    tiny_path = tiny_model(tmp_path_factory)[2]
    out = tmp_path / "rows.json"
    argv = ["--model", str(tiny_path), "--length", "5000", "--engines", "off,ours,mlx-lm", "--json", str(out)]
    assert beyond_window.main(argv) == 0
    data = json.loads(out.read_text())
    assert 4096 < data["tokens"] <= 5000 and len(data["key"]) == 5
    off, ours, theirs = data["rows"]
    assert "does not fit the context window of 4096 tokens" in off["refused"]
    assert ours["engine"] == "ours" and "refused" not in ours and isinstance(ours["ok"], bool) and ours["peak_gb"] > 0
    assert theirs["engine"] == "mlx-lm" and isinstance(theirs["got"], str)
    printed = capsys.readouterr().out
    assert "off     refused" in printed and printed.count("peak") == 2
    with pytest.raises(SystemExit):
        beyond_window.main(["--model", str(tiny_path), "--engines", "ours,nope"])


@pytest.mark.parametrize("interrupt", ["kill", "quit"])
def test_long_read_resumes_and_reopens(tmp_path_factory, tmp_path, capsys, interrupt):
    """Past the tiny model's 4,096-token window: killed (or quit) half-way, the resumed read reads only
    what the checkpoint lacks and answers as the cold read does; the reopened chat reads only the follow-up."""
    from api_support import tiny_model

    from qwen2_mlx.bench import long_read

    tiny_path = tiny_model(tmp_path_factory)[2]
    out = tmp_path / "long.json"
    argv = ["--model", str(tiny_path), "--tokens", "5000", "--every-seconds", "0", "--prefill-step-size", "256"]
    assert long_read.main(argv + ["--interrupt", interrupt, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    total, saved = data["prompt_tokens"], data["checkpoint_tokens"]
    assert 4096 < total <= 5000 and total / 2 <= saved < total
    assert data["resumed"]["prompt_tokens_read"] == total - saved
    assert data["cold"]["prompt_tokens_read"] == total and data["identical_reply"]
    assert data["reopened"]["cache_used"] and data["reopened"]["prompt_tokens_read"] < 100
    assert data["reader_exit"] == (0 if interrupt == "quit" else -9)  # a quit ends the reader by itself
    assert data["interrupt"] == interrupt and '"identical_reply": true' in capsys.readouterr().out
