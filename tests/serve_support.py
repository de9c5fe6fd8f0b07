"""Start `python -m qwen2_mlx.serve` as a real process on a free port, for the server's tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, *args: str, log: Path, timeout: float = 180, port: Optional[int] = None):
        self.port = port or free_port()  # a port given: the same server started again after a kill
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = log
        cmd = [sys.executable, "-m", "qwen2_mlx.serve", "--model", str(model), "--port", str(self.port)]
        if "--cache-dir" not in args and "--no-cache-dir" not in args:  # never the user's data folder
            args = (*args, "--cache-dir", str(log.parent / "serve-cache"))
        cmd += ["--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not answer /health in {timeout}s:\n{log.read_text()}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float = 30) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.health()
            if h["running"] == 0 and h["waiting"] == 0:
                return h
            time.sleep(0.05)
        raise AssertionError(f"the server stayed busy: {self.health()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
