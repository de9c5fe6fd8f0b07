"""Run one page's doc blocks in order (tests/test_docs.py starts it in a scratch folder with its own env).

Prints `DOCS-OK page:line` or `DOCS-FAIL {json}` per block. Python blocks share one namespace, as the
cells of a notebook do; bash blocks run in bash; a `qwen2-serve` block keeps its server up for the
blocks after it; `pip install` lines are checked against pyproject.toml's extras instead of run.
"""

from __future__ import annotations

import faulthandler
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PIP = re.compile(r"^\s*(?:python -m )?pip install\b(.*)$")


def check_pip(line: str, root: Path) -> None:
    """`pip install -e ".[a,b]"` names extras that exist; plain packages are in the test environment."""
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for arg in shlex.split(PIP.match(line).group(1), comments=True):
        for group in re.findall(r"\[([^\]]+)\]", arg):
            for name in group.split(","):
                if name.strip() not in extras:
                    raise AssertionError(f"`{line.strip()}`: pyproject.toml has no extra {name.strip()!r}")
        if not arg.startswith("-") and "[" not in arg and arg != ".":
            __import__(re.split(r"[<>=!~\[]", arg)[0].replace("-", "_"))  # an ImportError names the missing one


def start_server(code: str, port: int, timeout: float) -> subprocess.Popen:
    log = tempfile.NamedTemporaryFile("w+", prefix="docs-server-", suffix=".log", delete=False)  # a pipe could fill
    proc = subprocess.Popen(["bash", "-c", code], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}):\n{Path(log.name).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the server did not answer /health in {timeout}s")


def run_bash(code: str, timeout: float) -> None:
    # No terminal and no pipe: a block reads stdin only where it pipes something in itself.
    r = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    sys.stdout.write(r.stdout[-2000:])
    if r.returncode != 0:
        raise AssertionError(f"exit status {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")


def main(spec_path: str) -> int:
    faulthandler.enable()  # a crash inside MLX shows where it happened (stderr reaches the test's message)
    spec = json.loads(Path(spec_path).read_text())
    root, port, timeout = Path(spec["root"]), spec["port"], spec["timeout"]
    namespace: dict = {"__name__": "__main__"}
    servers: list[subprocess.Popen] = []
    failed = False
    try:
        for block in spec["blocks"]:
            where = f"{block['page']}:{block['line']}"
            try:
                if block["lang"] == "python":
                    exec(compile(block["code"], where, "exec"), namespace)
                    continue_ok = True
                else:
                    kept = []
                    for line in block["code"].splitlines():
                        if PIP.match(line):
                            check_pip(line, root)
                        else:
                            kept.append(line)
                    code = "\n".join(kept)
                    if re.match(r"^\s*qwen2-serve\b", code) and "--help" not in code:
                        servers.append(start_server(code, port, timeout))
                    elif code.strip():
                        run_bash(code, timeout)
                    continue_ok = True
            except BaseException:  # noqa: B036 (a block's SystemExit is a failure of that block too)
                failed, continue_ok = True, False
                print("\nDOCS-FAIL " + json.dumps({**block, "error": traceback.format_exc()[-4000:]}), flush=True)
            if continue_ok:
                print(f"\nDOCS-OK {where}", flush=True)
    finally:
        for proc in servers:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
