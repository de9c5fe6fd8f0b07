"""`qwen2-serve` under `mlx.launch -n 2 --backend ring`: the server as real processes, driven by the official
clients. Greedy replies must equal the single-process server's (dense and MoE, alone and batched), every
rank must pick the same tokens (each rank logs a CRC of a request's tokens), a client's disconnect must
cancel on every rank, and a rank killed with SIGKILL must end the whole job within seconds."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import httpx
import pytest
from openai import OpenAI
from serve_support import ServerProcess, free_port
from test_distributed import _free_ports
from tiny import DENSE, MOE, make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ALONE = "Hello, how are you?"
BATCH = ["The quick brown fox", "你好，世界！", "def main():", "Привет мир"]
DONE = re.compile(r"rank (\d): request (\d+) (\w+) after (\d+) tokens \(crc (\w+)\)")


class LaunchedServer:
    """`mlx.launch -n 2 --backend ring -- python -m qwen2_mlx.serve ...` in its own process group."""

    def __init__(self, model: Path, log: Path, *args: str, timeout: float = 240):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")  # two ranks share two cores
        launcher = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; main()"]
        cmd = launcher + ["-n", "2", "--backend", "ring", "--starting-port", str(_free_ports(2)), "--"]
        cmd += [sys.executable, "-m", "qwen2_mlx.serve", "--model", str(model), "--port", str(self.port)]
        cmd += ["--log-level", "info", "--rank-timeout", "60", *args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlx.launch exited ({self.proc.returncode}):\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the distributed server did not answer /health in {timeout}s:\n{log.read_text()}")

    def finished(self) -> dict:
        """(request, rank) -> (reason, tokens, crc), from the ranks' log lines."""
        return {(int(u), int(r)): (why, int(n), crc) for r, u, why, n, crc in DONE.findall(self.log.read_text())}

    def wait_finished(self, uids, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            done = self.finished()
            if all((u, r) in done for u in uids for r in (0, 1)):
                return done
            time.sleep(0.2)
        raise AssertionError(f"requests {uids} did not finish on both ranks:\n{self.log.read_text()[-3000:]}")

    def requests_so_far(self) -> int:
        """Requests rank 0 has finished (each took the next uid: 1, 2, ...), once none is running."""
        deadline = time.time() + 30
        while time.time() < deadline:
            h = httpx.get(self.url + "/health", timeout=10).json()
            if h["running"] == 0 and h["waiting"] == 0:
                return sum(h["finished"].values())
            time.sleep(0.1)
        raise AssertionError("the server stayed busy")

    def pids(self) -> dict:
        return {int(r): int(p) for r, p in re.findall(r"rank (\d) of 2: pid (\d+)", self.log.read_text())}

    def stop(self) -> None:
        """Stop rank 0 as a service manager would (SIGTERM); it stops the other ranks through the plan."""
        if self.proc.poll() is None:
            pids = self.pids()
            os.kill(pids[0], signal.SIGTERM) if 0 in pids else os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def replies(url: str, model: str) -> dict:
    """Greedy replies through both clients: one request alone, then several at once (batched)."""
    oa = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

    def chat(text: str, **extra) -> str:
        r = oa.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=16, temperature=0, **extra
        )
        return r.choices[0].message.content

    out = {"alone": chat(ALONE), "json": chat(ALONE, response_format={"type": "json_object"})}
    claude = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)
    m = claude.messages.create(
        model=model, max_tokens=16, messages=[{"role": "user", "content": ALONE}], extra_body={"temperature": 0}
    )
    out["anthropic"] = m.content[0].text
    batch = [None] * len(BATCH)

    def one(i: int) -> None:
        batch[i] = chat(BATCH[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(BATCH))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["batch"] = batch
    return out


@pytest.fixture(scope="module", params=["dense", "moe", "moe-pipeline"])
def served(request, tmp_path_factory):
    """A tiny model's replies from the single-process server, and the distributed server left running
    (tensor parallel, or with `--parallel pipeline`: each rank a slice of the layers)."""
    tmp = tmp_path_factory.mktemp(request.param)
    base, extra = (DENSE, {}) if request.param == "dense" else (MOE, {"mlp_only_layers": [1]})
    path, _ = make_checkpoint(tmp / "model", base, **extra)
    single = ServerProcess(path, "--no-cache-dir", log=tmp / "single.log")
    try:
        expected = replies(single.url, "model")
    finally:
        single.stop()
    server = LaunchedServer(
        path, tmp / "launch.log", *(["--parallel", "pipeline"] if "pipeline" in request.param else [])
    )
    yield server, expected
    if server.proc.poll() is None:  # (the others; the dense server's rank 1 was killed) a clean stop
        pids = server.pids()
        server.stop()
        log = server.log.read_text()
        assert server.proc.returncode == 0 and "exited with code" not in log and "error" not in log, log[-2000:]
        assert not [p for p in pids.values() if Path(f"/proc/{p}").exists()]


def test_greedy_replies_equal_the_single_process_server(served):
    server, expected = served
    before = server.requests_so_far()
    got = replies(server.url, "model")
    assert got == expected
    # Every rank ran every request to the same end with the same tokens.
    uids = range(before + 1, before + 8)
    done = server.wait_finished(uids)
    for uid in uids:
        assert done[(uid, 0)] == done[(uid, 1)], uid
    assert httpx.get(server.url + "/health").json()["batching"] is True


def test_seeded_sampling_repeats_and_every_rank_draws_alike(served):
    server, _ = served
    before = server.requests_so_far()
    oa = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    ask = dict(model="model", messages=[{"role": "user", "content": ALONE}], max_tokens=12, temperature=1.0)
    first, second = (oa.chat.completions.create(seed=11, **ask).choices[0].message.content for _ in range(2))
    unseeded = oa.chat.completions.create(**ask)  # rank 0 picks a seed and sends it to every rank
    assert first == second and unseeded.choices[0].message.content is not None
    uids = range(before + 1, before + 4)
    done = server.wait_finished(uids)
    for uid in uids:
        assert done[(uid, 0)] == done[(uid, 1)], uid


def test_a_disconnect_cancels_on_every_rank(served):
    server, _ = served
    before = server.requests_so_far()
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"model": "model", "prompt": list(range(5, 40)), "max_tokens": 3000, "temperature": 0, "stream": True},
        timeout=60,
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 4:
                break  # leaving the block closes the connection mid-reply
    uid = before + 1
    done = server.wait_finished([uid])
    assert done[(uid, 0)][0] == done[(uid, 1)][0] == "cancelled", done[(uid, 0)]
    assert done[(uid, 0)][1] < 3000


@pytest.mark.parametrize("served", ["dense"], indirect=True)
def test_a_killed_rank_ends_the_job_within_seconds(served):
    """Last for the dense server (the others are stopped cleanly by the fixture). mlx.launch sees rank 1
    die and stops rank 0, which says so and exits 1."""
    server, _ = served
    pids = server.pids()
    os.kill(pids[1], signal.SIGKILL)
    started = time.time()
    server.proc.wait(timeout=60)
    took = time.time() - started
    log = server.log.read_text()
    # rank 0's ring link fails at once ("rank 1 is gone"), or the launcher's SIGTERM ends its wait
    assert re.search(r"qwen2-serve: error: rank (1 is gone|0 waited) .*; ending the job", log), log[-2000:]
    assert "Node with rank 0 exited with code 1" in log
    assert took < 30, took
    for pid in pids.values():  # no rank left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
