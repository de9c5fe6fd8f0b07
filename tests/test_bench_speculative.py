"""`python -m qwen2_mlx.bench --lookup / --draft-model`: the task set, argument errors, a tiny run."""

from __future__ import annotations

import json

import pytest
from api_support import tiny_model

from qwen2_mlx.bench import compare, speculative


def test_task_set_covers_the_kinds_and_languages():
    tasks = speculative.load_tasks()
    assert {t["kind"] for t in tasks} == {"code-edit", "quote", "chat", "free"}
    assert {t["lang"] for t in tasks} == {"en", "zh"}
    assert any(len(t["messages"]) >= 3 for t in tasks)  # a multi-turn chat
    names = [t["name"] for t in tasks]
    assert len(names) == len(set(names))
    with pytest.raises(ValueError, match="unknown task nope"):
        speculative.load_tasks(names=["nope"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--random", "qwen2-0.5b", "--lookup"], "need --model"),
        (["--model", "m", "--lookup", "--draft-model", "d"], "not both"),
        (["--model", "m", "--draft-model", "d", "--num-draft-tokens", "0"], "at least 1"),
    ],
)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        compare.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_task_file_is_one_line(tmp_path_factory, tmp_path, capsys):
    _, _, path = tiny_model(tmp_path_factory)
    bad = tmp_path / "tasks.json"
    bad.write_text("{}")
    assert compare.main(["--model", str(path), "--lookup", "--tasks-file", str(bad)]) == 2
    assert "not a task file" in capsys.readouterr().err


def test_tiny_run_lookup_and_draft_against_mlx_lm(tmp_path_factory, tmp_path, capsys):
    _, _, path = tiny_model(tmp_path_factory)
    out = tmp_path / "spec.json"
    argv = ["--model", str(path), "--gen-tokens", "12", "--runs", "1", "--task", "story-en", "--task", "quote-doc-zh"]
    assert compare.main(argv + ["--lookup", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["name"] for r in res["tasks"]] == ["quote-doc-zh", "story-en"]
    assert all(r["identical"] and r["tokens"] == 12 for r in res["tasks"])
    assert "lookup/plain" in capsys.readouterr().out
    assert compare.main(argv + ["--draft-model", str(path), "--compare-mlx-lm", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert all(r["identical"] and r["mlx_lm_tps"] > 0 and r["acceptance"] == 1.0 for r in res["tasks"])
    assert "ours/mlx-lm" in capsys.readouterr().out
