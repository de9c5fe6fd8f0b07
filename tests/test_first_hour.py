"""Issue 26, the first hour: what a new user meets outside the README's examples (those run in test_docs.py).

Each test reproduces one of the issue's numbered items: library users told about OpenBLAS, `qwen2-run`,
`/help` rows with a `|`, the notebook's files, `qwen2-serve` on a busy port, a wrong `--model`, an empty
pipe, and the small items of 9.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2_mlx.runtime.blas import DISABLE_ENV, GUARD_ENV, OPENBLAS_PATHS, mlx_uses_cpu

ROOT = Path(__file__).resolve().parents[1]
LIB = next((p for p in OPENBLAS_PATHS if os.path.exists(p)), None)
needs_openblas = pytest.mark.skipif(
    LIB is None or not sys.platform.startswith("linux"), reason="needs OpenBLAS on Linux"
)
ON_CPU = mlx_uses_cpu()  # with MLX on a GPU (CUDA) OpenBLAS is beside the point: nothing said, nothing preloaded


def plain_env(**extra) -> dict:
    """The environment of a user's shell: no OpenBLAS preloaded, no re-run guard, this checkout first."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", GUARD_ENV, DISABLE_ENV)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def run(args: list[str], env=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env or plain_env(), capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    from tiny import make_checkpoint

    path = tmp_path_factory.mktemp("tiny-first-hour")
    make_checkpoint(path)
    return path


# --- item 2: library users and OpenBLAS ----------------------------------------------------------


@needs_openblas
def test_first_load_without_openblas_says_once_how_to_get_it(tiny_path):
    code = f"from qwen2_mlx import load\nload({str(tiny_path)!r})\nload({str(tiny_path)!r})\nprint('done')"
    r = run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "OpenBLAS" in line]
    if not ON_CPU:
        assert lines == [], r.stderr
        return
    assert len(lines) == 1, r.stderr  # once, however many loads
    assert "qwen2-run python" in lines[0] and LIB in lines[0]


@needs_openblas
def test_qwen2_run_starts_a_script_with_openblas_preloaded(tiny_path):
    code = (
        f"import os\nfrom qwen2_mlx import load\nload({str(tiny_path)!r})\n"
        "print(os.environ.get('LD_PRELOAD', '-'))\nprint('/libopenblas' in open('/proc/self/maps').read())"
    )
    r = run([sys.executable, "-m", "qwen2_mlx.runtime.launch", sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    preload, mapped = r.stdout.split()
    if ON_CPU:
        assert preload.split(":")[0] == LIB and mapped == "True"  # really loaded in the script's process
    else:
        assert preload == "-"  # on a GPU the script is only run
    assert "OpenBLAS" not in r.stderr  # preloaded: nothing to say


def test_qwen2_run_without_a_command_says_how_to_use_it():
    r = run([sys.executable, "-m", "qwen2_mlx.runtime.launch"])
    assert r.returncode == 2 and "usage: qwen2-run" in r.stderr


def test_library_hint_names_the_fix_for_each_case():
    from qwen2_mlx.loading.openblas import library_hint

    assert library_hint({}, "linux", True, "", exists=lambda p: p == LIB) is not None
    found = library_hint({}, "linux", True, "", exists=lambda p: p == OPENBLAS_PATHS[0])
    assert f"LD_PRELOAD={OPENBLAS_PATHS[0]}" in found and "qwen2-run jupyter lab" in found
    missing = library_hint({}, "linux", True, "", exists=lambda p: False)
    assert "apt install libopenblas0-pthread" in missing and "\n" not in missing
    assert library_hint({}, "linux", True, "7f.. /usr/lib/libopenblas.so.0\n", exists=lambda p: True) is None
    numpy_own = "7f.. /venv/numpy.libs/libscipy_openblas64_-32a4b2a6.so\n"  # unusable by MLX: not the fast path
    assert library_hint({}, "linux", True, numpy_own, exists=lambda p: True) is not None
    assert library_hint({}, "darwin", True, "", exists=lambda p: True) is None
    assert library_hint({}, "linux", False, "", exists=lambda p: True) is None  # MLX on a GPU
    assert library_hint({DISABLE_ENV: "1"}, "linux", True, "", exists=lambda p: True) is None


# --- item 9: no OpenBLAS line for --help ---------------------------------------------------------


@pytest.mark.parametrize("module", ["tui", "qwen2_mlx.serve", "qwen2_mlx.eval", "qwen2_mlx.bench"])
def test_help_prints_no_openblas_line(module):
    r = run([sys.executable, "-m", module, "--help"])
    assert r.returncode == 0 and "usage:" in r.stdout
    assert "OpenBLAS" not in r.stderr, r.stderr


# --- item 3: /help rows with a `|` ---------------------------------------------------------------


def test_help_table_keeps_commands_whose_usage_has_a_bar():
    from markdown_it import MarkdownIt

    from tui.screens.dialogs import help_markdown
    from tui.slash import help_rows

    tokens = MarkdownIt("gfm-like").parse(help_markdown("keymap.json", commands=help_rows()))
    rows, row = [], None
    for t in tokens:
        if t.type == "tr_open":
            row = []
        elif t.type == "inline" and row is not None:
            row.append(t.content)
        elif t.type == "tr_close":
            rows.append(row)
            row = None
    by_usage = {r[0]: r for r in rows}
    for usage, does in help_rows():
        cells = by_usage.get(f"`{usage}`") or by_usage.get(f"`{usage.replace('|', chr(92) + '|')}`")
        assert cells is not None and len(cells) == 2 and cells[1] == does, (usage, rows)
    assert any("|" in usage for usage, _ in help_rows())  # the case this test is about exists


# --- item 7: a wrong --model; item 8: an empty pipe ----------------------------------------------


def test_chat_with_a_wrong_model_says_so_in_one_line(tmp_path):
    r = run([sys.executable, "-m", "tui", "--model", str(tmp_path / "nowhere"), "-p", "hi"], stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip() and "OpenBLAS" not in line]
    assert len(lines) == 1 and str(tmp_path / "nowhere") in lines[0], r.stderr
    assert "convert.py" not in r.stderr  # the user named their own folder


def test_serve_with_a_wrong_model_says_so_in_one_line(tmp_path):
    r = run([sys.executable, "-m", "qwen2_mlx.serve", "--model", str(tmp_path / "nowhere")])
    lines = [line for line in r.stderr.splitlines() if line.strip() and "OpenBLAS" not in line]
    assert r.returncode == 2 and len(lines) == 1 and str(tmp_path / "nowhere") in lines[0], r.stderr


def test_chat_without_a_default_model_tells_how_to_make_one(tmp_path):
    r = run(
        [sys.executable, "-m", "tui", "-p", "hi"], env=plain_env(XDG_DATA_HOME=str(tmp_path)), stdin=subprocess.DEVNULL
    )
    assert r.returncode == 2 and "python convert.py" in r.stderr
    assert r.stderr.count("convert.py") == 1, r.stderr


def test_an_empty_pipe_is_reported_not_sent(tiny_path):
    r = subprocess.run(
        f"printf '' | {sys.executable} -m tui --model {tiny_path} -p 'Review this diff'",
        shell=True,
        cwd=ROOT,
        env=plain_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "nothing came on stdin" in r.stderr, r.stderr
    assert r.stdout == ""


def test_a_prompt_with_stdin_from_dev_null_still_runs(tiny_path):
    """No pipe at all (cron, CI: stdin is /dev/null) is not an empty pipe."""
    r = run(
        [sys.executable, "-m", "tui", "--model", str(tiny_path), "-p", "hi", "--max-tokens", "3"],
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr


# --- item 6: qwen2-serve on a port in use ---------------------------------------------------------


def test_serve_on_a_busy_port_fails_before_loading(tiny_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run([sys.executable, "-m", "qwen2_mlx.serve", "--model", str(tiny_path), "--port", str(port)], timeout=60)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "OpenBLAS" not in line]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
    assert "loading" not in r.stderr.lower() and "INFO" not in r.stderr


# --- item 9: the small things ----------------------------------------------------------------------


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_the_welcome_names_the_key_that_moves_to_the_messages(tmp_path):
    from tui_helpers import make_app, ready, send

    from tui.screens.chat import EMPTY_HINT
    from tui.widgets.transcript import MessageView

    assert "Shift+Tab moves to the messages" in EMPTY_HINT
    app = make_app(tmp_path, replies=["hello there"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "hi")
        app.prompt.focus()
        await pilot.press("shift+tab")
        await pilot.pause()
        assert isinstance(app.focused, MessageView)  # the key the welcome names does what it says


@pytest.mark.anyio
async def test_status_bar_speeds_belong_to_the_reply_being_written(tmp_path):
    from tui_helpers import make_app, ready, send, wait_until

    app = make_app(tmp_path, replies=["one two three"], delay=1.5)  # slow tokens: room to look before the first
    stats = lambda: str(app.status.query_one("#status-stats").render())  # noqa: E731
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "first")
        assert "gen 30.0 t/s" in stats()
        await send(pilot, "second", wait=False)
        await wait_until(pilot, lambda: app.chat.job is not None)
        assert stats() == ""  # not the previous reply's figures
        await wait_until(pilot, lambda: "two" in app.chat.reply_text)
        assert "gen 30.0 t/s" in stats()  # this reply's, as it streams
        await wait_until(pilot, lambda: app.chat.job is None)


def test_status_bar_shows_a_count_not_a_rate_for_a_few_new_prompt_tokens():
    from tui.engine import Stats
    from tui.widgets.status import stats_text

    regen = Stats(prompt_tokens=2, prompt_tps=2.1, generation_tokens=40, generation_tps=5.0, time_to_first_token=0.9)
    assert "prompt 2 t/s" not in stats_text(regen) and "prompt 2 new tok" in stats_text(regen)
    first = Stats(prompt_tokens=300, prompt_tps=95.0, generation_tokens=40, generation_tps=5.0)
    assert "prompt 95 t/s" in stats_text(first)


def test_an_exported_stopped_reply_closes_its_code_fence():
    from markdown_it import MarkdownIt

    from tui.export import to_markdown

    cut = "Here:\n\n```python\ndef f(x):\n    return"
    md = to_markdown("t", None, [{"role": "user", "content": "code"}, {"role": "assistant", "content": cut}])
    fences = [t for t in MarkdownIt("commonmark").parse(md) if t.type == "fence"]
    assert len(fences) == 1 and fences[0].content == "def f(x):\n    return\n"
    assert md.rstrip().endswith("```")
    done = "```\nx\n```"  # a closed fence gets no second one
    assert to_markdown("t", None, [{"role": "assistant", "content": done}]).count("```") == 2


def test_the_real_model_fixture_reuses_a_matching_default_model(tmp_path):
    from conftest import reusable_conversion
    from tiny import DENSE, make_checkpoint
    from tiny_gguf import write_gguf

    from qwen2_mlx.convert.converter import convert
    from qwen2_mlx.convert.gguf import GGUFSource

    def gguf(name, seed):
        ckpt, _ = make_checkpoint(tmp_path / f"hf-{name}", DENSE, seed=seed)
        return write_gguf(tmp_path / f"{name}.gguf", ckpt, DENSE)

    a, b = gguf("a", 0), gguf("b", 1)
    convert(GGUFSource(a), tmp_path / "from-a", dtype="float32")
    assert reusable_conversion(tmp_path / "from-a", a)
    assert not reusable_conversion(tmp_path / "from-a", b)  # same shapes, other weights
    convert(GGUFSource(a), tmp_path / "from-a-f16", dtype="float16")
    assert not reusable_conversion(tmp_path / "from-a-f16", a)
    assert not reusable_conversion(tmp_path / "nowhere", a)


# --- item 1: every command defaults to the converted model ---------------------------------------


def test_commands_default_to_the_converted_model(tmp_path, monkeypatch):
    from qwen2_mlx.bench import compare
    from qwen2_mlx.bench import serve as bench_serve
    from qwen2_mlx.loading.paths import default_model_path

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert compare.parse_args([]).model == str(default_model_path())
    assert compare.parse_args(["--random", "qwen2-0.5b"]).model is None  # --random still replaces it
    assert bench_serve.build_parser().parse_args([]).model == str(default_model_path())
