"""`python -m qwen2_mlx.bench.serve_ranks`: qwen2-serve in one process and across local ranks.

Starts `qwen2-serve` as one process, then under `mlx.launch -n N --backend ring`, on the same folder;
asks each the same question (streamed, greedy) and prints the reply, decode speed, and the serving
process's peak memory as `/health` reports it (under mlx.launch: rank 0's, the process that listens).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .serve import Server, _free_port, stream_chat


class LaunchedServer(Server):
    """qwen2-serve on `ranks` local ranks of `mlx.launch --backend ring`, rank 0 on a free port."""

    def __init__(self, model: str, ranks: int, log_dir: Path, parallel: str = "tensor"):
        self.kind, self.port = f"qwen2-serve on {ranks} ranks ({parallel})", _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        launcher = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
        cmd = launcher + ["-n", str(ranks), "--backend", "ring", "--starting-port", str(_free_port()), "--"]
        cmd += [sys.executable, "-m", "qwen2_mlx.serve", "--model", model, "--port", str(self.port)]
        cmd += ["--parallel", parallel]
        self.log = log_dir / "launch.log"
        self.proc = subprocess.Popen(
            cmd + ["--log-level", "warning"],
            env=env,
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait()

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: rank 0 stops every rank
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def measure(server: Server, model: str, question: str, max_tokens: int) -> dict:
    import httpx

    try:
        r = stream_chat(server.url, model, [{"role": "user", "content": question}], max_tokens)
        r["peak_rss_gb"] = httpx.get(server.url + "/health", timeout=30).json()["peak_rss_gb"]
    finally:
        server.stop()
    r["tok_s"] = r["tokens"] / max(r["end"] - r["start"] - r["ttft"], 1e-9)
    return r


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.serve_ranks", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--parallel", choices=("tensor", "pipeline"), default="tensor")
    p.add_argument("--question", default="用中文简单介绍一下长城。")
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args(argv)
    name = Path(a.model).resolve().name
    with tempfile.TemporaryDirectory() as tmp:
        single = measure(Server("qwen2-serve", a.model, ["--no-cache-dir"], Path(tmp)), name, a.question, a.max_tokens)
        launched = LaunchedServer(a.model, a.ranks, Path(tmp), a.parallel)
        split = measure(launched, name, a.question, a.max_tokens)
    print(f"question: {a.question}")
    for label, r in (("1 process", single), (f"{a.ranks} ranks, {a.parallel}", split)):
        print(f"\n[{label}] {r['text']}")
        print(
            f"[{label}] {r['tokens']} tokens, time to first token {r['ttft']:.2f} s, decode {r['tok_s']:.1f} tok/s, "
            f"peak memory of the serving process (rank 0) {r['peak_rss_gb']:.2f} GB"
        )
    print(f"\nsame reply: {single['text'] == split['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
