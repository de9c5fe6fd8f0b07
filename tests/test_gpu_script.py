"""The GPU run (scripts/gpu_prepare.sh, gpu_run.sh, gpu_run.py, rope_check.py), rehearsed on the CPU.

The rehearsal is the same code path as the GPU run with tiny models and lengths: cut a tiny GGUF into
three per-call folders, stage them call by call, convert the model once its pieces are all there, run
every step in the background driver and collect the results. No GPU and no carried wheels needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def _env(tmp_path: Path) -> dict:
    env = dict(
        os.environ,
        GPU_RUN_REHEARSAL="1",
        PYTHON=sys.executable,
        GPU_RUN_DIR=str(tmp_path / "state"),
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
        PYTHONUNBUFFERED="1",
    )
    for name in ("GPU_RUN_ONLY", "GPU_RUN_SKIP", "NIAH_LENGTHS", "PASSKEY_LENGTHS", "OUT"):
        env.pop(name, None)
    return env


def _steps(results: Path) -> dict:
    return {r["step"]: r for r in map(json.loads, (results / "steps.jsonl").read_text().splitlines())}


def _gpu_run():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import gpu_run
    finally:
        sys.path.pop(0)
    return gpu_run


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_prints_the_summary(tmp_path):
    env = _env(tmp_path)
    src, carry = tmp_path / "src", tmp_path / "carry"
    prep = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_prepare.sh")],
        cwd=ROOT,
        env=dict(env, CARRY_DIR=str(src)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    calls = [json.loads(line) for line in prep.stdout.splitlines() if line.startswith("{")]
    assert [c["call"] for c in calls] == [1, 2, 3, 4]  # three carrying calls, then one to continue
    assert all(len(c["command"]) <= 2000 and len(c["carry"]) <= 8 for c in calls)

    carry.mkdir()
    for k in (1, 2, 3):  # each call brings its own folder; the earlier ones stay (ignored paths are kept)
        (carry / f"call-{k}").mkdir()
        for f in (src / f"call-{k}").iterdir():
            (carry / f"call-{k}" / f.name).write_bytes(f.read_bytes())
        wait = "1200" if k == 3 else "0"
        run = subprocess.run(
            [
                "bash",
                str(SCRIPTS / "gpu_run.sh"),
                "--carry-dir",
                str(carry),
                "--out",
                str(tmp_path / f"out{k}"),
                "--wait",
                wait,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert "== issue 25 GPU run (REHEARSAL" in run.stdout
    out = tmp_path / "out3"
    assert "driver not running" in run.stdout, run.stdout[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "steps.jsonl", "summary.txt"]
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())

    names = [s.name for s in _gpu_run().Plan(tmp_path / "state", rehearsal=True).steps()]
    steps = _steps(out)
    assert sorted(names) == sorted(steps)
    assert {
        "rope-check",
        "tests",
        "niah-dca-1K",
        "niah-dca-grid",
        "niah-dca-alt-grid",
        "passkey-yarn-1K",
        "bench-tiny-4bit",
        "long-256",
        "tests-real",
    } <= set(steps)
    bad = {n: (r["status"], r.get("tail", "")[-500:]) for n, r in steps.items() if r["status"] not in ("ok", "skipped")}
    assert not bad, bad
    assert steps["bench-tiny-float32"]["summary"]["ratio_ours_over_mlx_lm"]["decode_tps"] > 0
    assert steps["long-256"]["summary"]["speed"], steps["long-256"]
    assert "decode" in _gpu_run().figures(steps["long-256"])
    # A tiny random model finds no needle, so the alternative DCA settings ran (they run below 90 %).
    assert steps["niah-dca-alt-1K"]["status"] == "ok"
    assert steps["rope-check"]["summary"]["lines"], steps["rope-check"]
    assert "30/30 steps finished" in (out / "summary.txt").read_text()
    assert "goals (issue 25):" in run.stdout

    # A rerun finds everything done: it starts no step and prints the same summary.
    again = subprocess.run(
        [
            "bash",
            str(SCRIPTS / "gpu_run.sh"),
            "--carry-dir",
            str(carry),
            "--out",
            str(tmp_path / "out4"),
            "--wait",
            "60",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert _steps(tmp_path / "out4").keys() == steps.keys()
    assert "30/30 steps finished" in again.stdout


def test_steps_are_resumed_not_rerun(tmp_path):
    """The driver skips steps already in steps.jsonl and ignores a torn last line (a kill mid-write)."""
    gpu_run = _gpu_run()
    plan = gpu_run.Plan(tmp_path, rehearsal=True)
    names = [s.name for s in plan.steps()]
    assert names[:5] == ["rope-check", "bench-tiny-float32", "bench-tiny-moe-float32", "long-256", "tests"]
    assert names[-1] == "tests-real"
    plan.results.mkdir()
    gpu_run.append_step(plan.results, {"step": "tests", "status": "ok", "seconds": 1.0})
    with open(plan.results / "steps.jsonl", "a") as f:
        f.write('{"step": "niah-dca-5')  # torn
    assert list(gpu_run.read_steps(plan.results)) == ["tests"]
    gpu_run.append_step(plan.results, {"step": "long-256", "status": "failed", "seconds": 2.0})
    assert list(gpu_run.read_steps(plan.results)) == ["tests", "long-256"]
    text = gpu_run.write_summary(plan)
    assert "2/30 steps finished" in text and "niah-dca-1K" in text


def test_steps_waiting_for_the_model_hold_back_all_but_the_goal_steps(tmp_path):
    """Before the model arrives only goal-ranked steps run ahead (a 7B bench started then would hold the GPU)."""
    gpu_run = _gpu_run()
    plan = gpu_run.Plan(tmp_path, rehearsal=True)
    pending = [s for s in plan.steps() if s.name not in ("rope-check", "tests")]
    assert gpu_run.next_step(plan, pending).name == "bench-tiny-float32"  # past niah-dca, which waits
    late = [s for s in pending if s.priority > gpu_run.GOAL_PRIORITY]
    assert gpu_run.next_step(plan, late) is None  # bench-tiny-4bit needs no model, but ranks after NIAH
    (plan.model).mkdir(parents=True)
    (plan.model / "config.json").write_text("{}")
    assert gpu_run.next_step(plan, late).name == "niah-plain-768"
    # While the suite runs beside, no speed step starts: NIAH does.
    assert gpu_run.next_step(plan, pending, busy=True).name == "niah-dca-512"


def test_prepare_cuts_payloads_into_calls_under_the_limit(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(2500))
    b.write_bytes(os.urandom(4100))
    carry = tmp_path / "carry"
    r = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "gpu_run.py"),
            "prepare",
            "--carry-dir",
            str(carry),
            "--call-bytes",
            "3000",
            "--payload",
            f"site={a}",
            "--payload",
            f"gguf={b}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    calls = sorted(carry.glob("call-*"))
    assert len(calls) == 3  # 6600 bytes at 3000 a call
    for d in calls:
        assert sum(f.stat().st_size for f in d.iterdir() if f.name != "manifest.json") <= 3000
    m = json.loads((calls[0] / "manifest.json").read_text())
    assert [p["name"] for p in m["payloads"]] == ["site", "gguf"]
    joined = b"".join((carry / f"call-{x['call']}" / x["file"]).read_bytes() for x in m["payloads"][1]["pieces"])
    assert joined == b.read_bytes()


def test_carried_wheels_reach_every_child_as_if_installed(tmp_path):
    """The first lease's children lost the wheels (a clean environment, `python -I`): after install_site a
    `-I` interpreter reading the .pth imports them and the tree, console scripts run by name, and
    site/nvidia points at the machine's CUDA libraries (libmlx.so's RPATH)."""
    g = _gpu_run()
    site, purelib, nvidia = tmp_path / "site", tmp_path / "purelib", tmp_path / "nvidia"
    (site / "carried_pkg").mkdir(parents=True)
    (site / "carried_pkg" / "__init__.py").write_text("def main():\n    print('carried')\n    return 3\n")
    (site / "carried_pkg-1.0.dist-info").mkdir()
    entry = "[console_scripts]\ncarried-cmd = carried_pkg:main\n[gui_scripts]\nnot-a-console-one = x:y\n"
    (site / "carried_pkg-1.0.dist-info" / "entry_points.txt").write_text(entry)
    nvidia.mkdir()
    g.install_site(site, tmp_path / "bin", purelib, nvidia)
    code = f"import site; site.addsitedir({str(purelib)!r}); import carried_pkg, qwen2_mlx.bench.presets"
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0
    names = sorted(p.name for p in (tmp_path / "bin").iterdir())
    assert names == ["carried-cmd", "qwen2-chat", "qwen2-convert", "qwen2-run", "qwen2-serve"]
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin", "PYTHONPATH": str(site)}
    r = subprocess.run(["carried-cmd"], capture_output=True, text=True, env=env)
    assert (r.returncode, r.stdout) == (3, "carried\n")
    assert (site / "nvidia").resolve() == nvidia.resolve()
    g.install_site(site, tmp_path / "bin", purelib, nvidia)  # a second unpack in the same lease: no error


def test_the_suite_runs_every_file_with_the_slow_ones_last():
    g = _gpu_run()
    args = g.suite_order(g.REAL.tests)
    files = [a for a in args if a.startswith("tests/test_") and a.endswith(".py")]
    assert sorted(files) == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    assert {Path(f).stem for f in files[-len(g.SLOW_LAST) :]} == set(g.SLOW_LAST)
    assert args[args.index("-n") + 1] == "16" and "SUITE" not in args
