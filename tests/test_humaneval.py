"""HumanEval: the sandbox that runs model-written programs, the prompt form, the sanitizer, the
published-figure table, and the command line on a tiny model (resumable, JSON, errors)."""

from __future__ import annotations

import json
import os
import time

import pytest
from tiny import DENSE, make_checkpoint

from qwen2_mlx.eval import humaneval, published
from qwen2_mlx.eval.__main__ import main
from qwen2_mlx.eval.humaneval import Completion, check_program, load_problems, prompt_text, sanitize
from qwen2_mlx.eval.results import ResultsFile
from qwen2_mlx.eval.sandbox import Limits, run_program, run_programs

FAST = Limits(timeout=3.0, memory=512 << 20, cpu=3)

# --- the sandbox ----------------------------------------------------------------------------


def test_a_passing_and_a_failing_program():
    assert run_program("assert sum([1, 2]) == 3\n", FAST).passed
    out = run_program("assert sum([1, 2]) == 4, 'wrong sum'\n", FAST)
    assert (out.passed, out.status) == (False, "failed") and "wrong sum" in out.detail


def test_a_program_that_loops_forever_is_stopped_and_the_run_goes_on():
    start = time.monotonic()
    outcomes = run_programs(["while True:\n    pass\n", "assert True\n"], FAST, workers=2)
    assert time.monotonic() - start < 15
    assert (outcomes[0].passed, outcomes[0].status) == (False, "timeout")
    assert outcomes[1].passed


def test_a_program_that_allocates_without_bound_is_stopped():
    src = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n"
    out = run_program(src, FAST)
    assert (out.passed, out.status) == (False, "memory")


def test_a_program_that_catches_memory_errors_still_fails_its_test():
    src = "try:\n    x = bytearray(4 << 30)\nexcept MemoryError:\n    x = None\nassert x is not None\n"
    assert not run_program(src, FAST).passed


@pytest.mark.parametrize(
    "write",
    [
        "open(TARGET, 'w').write('x')",
        "import os\nos.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))",
        "import pathlib\npathlib.Path(TARGET).write_text('x')",
        "try:\n    open(TARGET, 'a').write('x')\nexcept BaseException:\n    pass",  # catching does not help
    ],
)
def test_a_program_that_writes_outside_its_folder_is_stopped_and_nothing_is_written(tmp_path, write):
    target = tmp_path / "outside.txt"
    out = run_program(f"TARGET = {str(target)!r}\n{write}\n", FAST)
    assert (out.passed, out.status) == (False, "escape") and "outside its folder" in out.detail
    assert not target.exists()


def test_a_program_may_use_its_own_folder_and_not_start_processes(tmp_path):
    assert run_program("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n", FAST).passed
    assert run_program("import os\nos.system('touch %s')\n" % (tmp_path / "x"), FAST).status == "failed"
    assert run_program("import ctypes\n", FAST).status == "escape"
    assert not (tmp_path / "x").exists()


def test_the_program_does_not_run_in_our_process():
    out = run_program(f"import os\nassert os.getppid() == {os.getpid()}\nassert 'pytest' not in globals()\n", FAST)
    assert out.passed  # a child of ours, with a fresh interpreter


# --- prompts, sanitizing, scoring -----------------------------------------------------------


def test_problems_come_from_the_installed_package():
    problems = load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    assert [p["task_id"] for p in load_problems(3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_the_prompt_is_qwen_s_chatml_form():
    p = load_problems(1)[0]
    text = prompt_text(p)
    assert text.startswith("<|im_start|>system\nYou are an intelligent programming assistant")
    assert "<|im_start|>user\nCan you complete the following Python function?\n```python\nfrom typing" in text
    assert text.endswith('"""\n```\n<|im_end|>\n<|im_start|>assistant\n```python\n')


def test_every_canonical_solution_passes_and_an_empty_one_fails():
    problems = load_problems(12)
    programs = [check_program(p, p["prompt"] + p["canonical_solution"]) for p in problems]
    assert all(o.passed for o in run_programs(programs, Limits(timeout=20, cpu=20)))
    assert not run_program(check_program(problems[0], ""), FAST).passed


def test_sanitize_keeps_imports_and_what_the_entry_point_uses():
    reply = (
        "import math\nfrom typing import List\n\n"
        "def helper(x):\n    return math.sqrt(x)\n\n"
        "def unused():\n    return 1\n\n"
        "@staticmethod\ndef solve(xs: List[int]) -> float:\n    return helper(sum(xs))\n\n"
        "print(solve([4]))\nassert solve([1]) == 1\n```\nThis function computes..."
    )
    out = sanitize(reply, "solve")
    assert "import math" in out and "from typing import List" in out
    assert "def helper" in out and "@staticmethod\ndef solve" in out
    assert "unused" not in out and "print(" not in out and "assert" not in out and "This function" not in out


def test_sanitize_takes_the_longest_block_that_parses():
    reply = "Here is the code:\ndef f(x):\n    return x + 1\nand that is all, folks."
    assert sanitize(reply, "f") == "def f(x):\n    return x + 1\n"
    assert sanitize("no code at all", "f") == ""


def test_run_humaneval_scores_resumes_and_counts_a_runaway_as_failed(tmp_path):
    problems = load_problems(3)
    calls = []

    def engine(prompts, budgets):
        calls.append(len(prompts))
        by_id = {prompt_text(p): p for p in problems}
        out = []
        for text in prompts:
            p = by_id[text]
            body = p["canonical_solution"] if p["task_id"] != "HumanEval/1" else "    while True:\n        pass\n"
            out.append(Completion(p["prompt"] + body, "stop", 10))
        return out

    path = tmp_path / "r.jsonl"
    results = ResultsFile(path, {"command": "humaneval"})
    summary = humaneval.run_humaneval(problems[:2], engine, len, results, batch_size=2, limits=FAST)
    assert (summary["passed"], summary["problems"]) == (1, 2)
    assert summary["statuses"] == {"passed": 1, "timeout": 1}
    again = ResultsFile(path, {"command": "humaneval"})
    summary = humaneval.run_humaneval(problems, engine, len, again, batch_size=2, limits=FAST)
    assert calls == [2, 1]  # only the third problem was generated again
    assert (summary["passed"], summary["problems"]) == (2, 3)
    assert summary["pass@1"] == pytest.approx(200 / 3)
    assert summary["stderr"] == pytest.approx(100 * ((2 / 3) * (1 / 3) / 3) ** 0.5)


def test_the_published_table_matches_folder_names(tmp_path):
    names = published.table()
    assert published.match("qwen2.5-coder-0.5b-instruct-f32", names) == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert published.match("Qwen2.5-Coder-0.5B-Instruct", names) == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert published.match("qwen2.5-coder-0.5b-instructive", names) is None
    assert published.match("tiny", names) is None
    found = published.lookup("Qwen2.5-Coder-0.5B-Instruct", "humaneval", tmp_path / "x")
    assert found["score"] == 61.6 and "2409.12186" in found["source"]


# --- the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("he") / "tiny", DENSE)[0]


def test_cli_runs_resumes_and_writes_json(tiny_path, tmp_path, capsys):
    args = ["humaneval", "--model", str(tiny_path), "--limit", "2", "--max-tokens", "8", "--timeout", "5"]
    results, out = tmp_path / "r.jsonl", tmp_path / "he.json"
    assert main([*args, "--results", str(results), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["problems"] == 2 and summary["passed"] == 0  # a random model writes no working code
    assert summary["published"] is None and "pass@1" in capsys.readouterr().out
    first = [json.loads(line) for line in results.read_text().splitlines()[1:]]
    assert [r["id"] for r in first] == ["HumanEval/0", "HumanEval/1"] and all(r["tokens"] <= 8 for r in first)
    assert main([*args, "--limit", "3", "--results", str(results)]) == 0
    lines = results.read_text().splitlines()
    assert len(lines) == 1 + 3  # the first two were kept, only the third was added
    assert main([*args, "--max-tokens", "9", "--results", str(results)]) == 2  # other settings: refused
    assert "max_tokens" in capsys.readouterr().err


def test_cli_errors_are_one_line_before_loading(tmp_path, capsys):
    assert main(["humaneval", "--model", str(tmp_path / "none"), "--limit", "0"]) == 2
    assert "--limit must be positive" in capsys.readouterr().err
    assert main(["humaneval", "--model", str(tmp_path / "none"), "--published-name", "nope"]) == 2
    assert "--published-name nope" in capsys.readouterr().err
    assert main(["humaneval", "--model", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err


def test_quality_table_gains_humaneval_per_row(tiny_path, tmp_path, capsys):
    out = tmp_path / "table.json"
    args = ["quality", "--reference", str(tiny_path), "--table", "--variants", "float32,8-bit g64"]
    assert main([*args, "--humaneval", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["float32", "8-bit g64"]
    assert all(r["humaneval"]["problems"] == 2 and r["humaneval"]["pass@1"] == 0.0 for r in rows)
    assert "HumanEval pass@1 (2 problems)" in capsys.readouterr().out
    assert main([*args, "--humaneval", "200"]) == 2
    assert "--humaneval must be within 0..164" in capsys.readouterr().err


def test_mlx_lm_engine_gives_the_same_greedy_replies(tiny_path, tmp_path):
    common = ["humaneval", "--model", str(tiny_path), "--limit", "3", "--max-tokens", "12", "--batch-size", "3"]
    ours, theirs = tmp_path / "ours.json", tmp_path / "mlx-lm.json"
    assert main([*common, "--json", str(ours)]) == 0
    assert main([*common, "--engine", "mlx-lm", "--json", str(theirs)]) == 0
    a, b = (json.loads(p.read_text()) for p in (ours, theirs))
    assert b["settings"]["engine"] == "mlx-lm"
    assert [r["reply"] for r in a["records"]] == [r["reply"] for r in b["records"]]
    assert [r["tokens"] for r in a["records"]] == [r["tokens"] for r in b["records"]]
