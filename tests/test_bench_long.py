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
