"""bench_long runs end to end on a tiny checkpoint and prints both tables (no timing asserted)."""

from __future__ import annotations

from tiny import DENSE, make_checkpoint

from qwen2_mlx.bench.long import main


def test_bench_long_smoke(tmp_path, capsys):
    path, _ = make_checkpoint(tmp_path / "tiny", DENSE)
    rc = main(
        [
            "--model",
            str(path),
            "--chunk-size",
            "16",
            "--local-size",
            "4",
            "--decode-tokens",
            "2",
            "--prefill-step-size",
            "24",
            "--memory-lengths",
            "40",
            "--memory-chunk-size",
            "16",
            "--memory-local-size",
            "4",
            "--cpu-time",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    for length in ("16 |", "32 |", "64 |", "40 |"):
        assert length in out
    assert "decode plain" in out and "DCA peak" in out


def test_bench_long_bad_model_exits_2(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_bench_long_lengths_dtype_and_json(tmp_path, capsys):
    import json

    path, _ = make_checkpoint(tmp_path / "tiny", DENSE)
    out_file = tmp_path / "long.json"
    args = ["--model", str(path), "--chunk-size", "16", "--local-size", "4", "--decode-tokens", "2"]
    args += ["--lengths", "24,48", "--dtype", "bfloat16", "--json", str(out_file), "--memory-lengths", "40"]
    args += ["--memory-chunk-size", "16", "--memory-local-size", "4", "--cpu-time"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(bfloat16)" in out and "24 |" in out and "48 |" in out and "64 |" not in out
    figures = json.loads(out_file.read_text())
    assert [r["context"] for r in figures["speed"]] == [24, 48]
    assert all(r["decode dca"] > 0 and r["prefill plain"] > 0 for r in figures["speed"])
    assert [r["tokens"] for r in figures["memory"]] == [40]
    assert figures["settings"]["dtype"] == "bfloat16"


def test_bench_long_bad_arguments_fail_before_any_work(tmp_path, capsys):
    import pytest

    for bad in (["--lengths", "8,x"], ["--lengths", "1"], ["--json", str(tmp_path / "no" / "f.json")]):
        with pytest.raises(SystemExit) as e:
            main(["--model", str(tmp_path / "missing"), *bad])
        assert e.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_bench_long_without_memory_runs(tmp_path, capsys):
    """An empty --memory-lengths (the GPU run's first chunk size) skips the memory table, nothing else."""
    path, _ = make_checkpoint(tmp_path / "tiny", DENSE)
    args = ["--model", str(path), "--chunk-size", "16", "--local-size", "4", "--decode-tokens", "2"]
    assert main([*args, "--lengths", "24", "--memory-lengths", "", "--cpu-time"]) == 0
    out = capsys.readouterr().out
    assert "24 |" in out and "DCA peak" not in out
