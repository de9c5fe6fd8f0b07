"""The docs run as written (issue 26): every fenced `bash` and `python` block of README.md and docs/*.md
is executed against a tiny model placed at the default model path, or marked on the line before it with
`<!-- docs-test: skip (the reason) -->`; every relative link and #anchor resolves.

How a page runs: its blocks in order in one process (`python` blocks share one namespace, as in a
notebook; `bash` blocks run in bash), with `XDG_DATA_HOME` and `QWEN2_MLX_CACHE` in a temporary folder,
the checkout's commands first on PATH, and a scratch folder as the working directory (holding `convert.py`
and `assets/` as a clone does). Three rules keep it honest without a network or a real model:
- `pip install` lines are checked, not run: the extras they name exist in pyproject.toml (the test
  environment has every extra installed);
- a block that starts `qwen2-serve` leaves it running, once /health answers, for the page's later blocks
  (the client examples), and the page's port 8080 is swapped for a free one;
- each block has a time limit (a block that needs minutes is to be marked instead).

`python tests/test_docs.py` prints the count: blocks executed, blocks marked and why.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+)\)\s*-->")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
RUN_LANGS = ("bash", "python")
BLOCK_TIMEOUT = 180  # seconds; the tiny model answers in a few


@dataclass
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence
    lang: str
    code: str
    skip: Optional[str]  # the reason given by the marker, or None: the block runs


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file (any language), with the skip marker before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i, previous = [], 0, ""
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                previous = lines[i]
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{fence[0]}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        skip = SKIP.search(previous)
        rel = str(path.relative_to(ROOT))
        out.append(Block(rel, i + 1, lang, "\n".join(body) + "\n", skip.group(1).strip() if skip else None))
        previous, i = "", j + 1
    return out


def runnable(path: Path) -> list[Block]:
    return [b for b in blocks_of(path) if b.lang in RUN_LANGS]


def report() -> str:
    """Blocks executed and blocks marked, with the reasons, for every page."""
    executed, skipped = 0, []
    for page in PAGES:
        for b in runnable(page):
            if b.skip is None:
                executed += 1
            else:
                skipped.append(f"  {b.page}:{b.line} ({b.lang}): {b.skip}")
    return "\n".join([f"{executed} blocks executed, {len(skipped)} marked not runnable here:", *skipped])


# --- links -----------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\w)|(?<=\w)_", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, counts = set(), {}
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        m = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m and not in_code:
            base = slug(m.group(1))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def prose(path: Path) -> str:
    """The page without its fenced blocks and inline code (a link inside code is not a link)."""
    text, kept, in_code = path.read_text(encoding="utf-8"), [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in LINK.findall(prose(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    assert broken_links(page) == [], f"{page.relative_to(ROOT)}: broken links"


def test_link_check_catches_what_it_should(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## The `path` of a token\n\n[ok](#the-path-of-a-token) [b](b.md#x)\n")
    (tmp_path / "b.md").write_text("# Y\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert broken_links(tmp_path / "a.md") == ["b.md#x: no heading with anchor #x in b.md"]
        (tmp_path / "a.md").write_text("[gone](missing.md) `[code](not-a-link.md)`\n")
        assert broken_links(tmp_path / "a.md") == ["missing.md: no such file missing.md"]
    finally:
        ROOT = saved


# --- running the blocks -----------------------------------------------------------------------------


def test_every_block_runs_or_says_why_not():
    for page in PAGES:
        for b in runnable(page):
            assert b.skip is None or len(b.skip) >= 10, f"{b.page}:{b.line}: give the reason in the marker"
    print(report())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shims(bin_dir: Path) -> None:
    """The project's commands as this checkout defines them (an installed copy may be older)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    bin_dir.mkdir()
    for name, target in scripts.items():
        module, func = target.split(":")
        shim = bin_dir / name
        shim.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        shim.chmod(0o755)


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory):
    from tiny import make_checkpoint

    from qwen2_mlx.loading.paths import default_model_path

    base = tmp_path_factory.mktemp("docs")
    env = dict(os.environ, XDG_DATA_HOME=str(base / "data"), QWEN2_MLX_CACHE=str(base / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("QWEN2_MLX_MODEL", None)
    old = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = env["XDG_DATA_HOME"]
    try:
        # head size 64, as in real Qwen2 models, so KV-cache quantization's group of 64 fits
        make_checkpoint(default_model_path(), hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    finally:
        os.environ.pop("XDG_DATA_HOME") if old is None else os.environ.__setitem__("XDG_DATA_HOME", old)
    _shims(base / "bin")
    env["PATH"] = f"{base / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return base, env


RUNNER = ROOT / "tests" / "docs_runner.py"


@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(b.skip is None for b in runnable(p))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_page_blocks_run(page, docs_env, tmp_path):
    base, env = docs_env
    work = tmp_path / "work"
    work.mkdir()
    for name in ("convert.py", "assets"):
        (work / name).symlink_to(ROOT / name)
    port = _free_port()
    todo = [asdict(b) | {"code": b.code.replace("8080", str(port))} for b in runnable(page) if b.skip is None]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps({"blocks": todo, "port": port, "timeout": BLOCK_TIMEOUT, "root": str(ROOT)}))
    r = subprocess.run(
        [sys.executable, str(RUNNER), str(spec)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT * (len(todo) + 1),
    )
    failures = [
        json.loads(line[len("DOCS-FAIL ") :]) for line in r.stdout.splitlines() if line.startswith("DOCS-FAIL ")
    ]
    done = [line for line in r.stdout.splitlines() if line.startswith("DOCS-OK ")]
    detail = "\n\n".join(f"{f['page']}:{f['line']} ({f['lang']}):\n{f['error']}" for f in failures)
    assert r.returncode == 0 and not failures, detail or r.stdout[-3000:] + r.stderr[-3000:]
    assert len(done) == len(todo)


if __name__ == "__main__":
    print(report())
