"""OpenBLAS re-exec (blas.py): the decision, and one real re-exec in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2_mlx.runtime.blas import (
    DISABLE_ENV,
    GUARD_ENV,
    NO_OPENBLAS_HINT,
    OPENBLAS_PATHS,
    openblas_missing,
    openblas_to_preload,
)

LIB = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
ROOT = Path(__file__).resolve().parents[1]


def decide(env=None, platform="linux", cpu=True, present=(LIB,)):
    return openblas_to_preload(env or {}, platform, cpu, exists=lambda p: p in present)


def test_preloads_on_linux_cpu_when_openblas_is_installed():
    assert decide() == LIB
    fedora = "/usr/lib64/libopenblas.so.0"
    assert decide(present=(fedora,)) == fedora
    assert decide(env={"LD_PRELOAD": "/usr/lib/libjemalloc.so"}) == LIB  # another preload is kept, not a reason


def test_leaves_the_process_alone_otherwise():
    assert decide(platform="darwin") is None
    assert decide(cpu=False) is None  # CUDA or Metal: BLAS is not on the hot path
    assert decide(present=()) is None
    assert decide(env={DISABLE_ENV: "1"}) is None
    assert decide(env={DISABLE_ENV: "0"}) == LIB
    assert decide(env={"LD_PRELOAD": LIB}) is None
    assert decide(env={"LD_PRELOAD": "/opt/lib/libopenblas.so.0"}) is None
    assert decide(env={GUARD_ENV: "1"}) is None  # never a second re-exec, even if the preload failed


def test_a_missing_openblas_is_reported_once_with_the_package_to_install():
    assert openblas_missing({}, "linux", True, exists=lambda p: False)
    assert not openblas_missing({}, "linux", True, exists=lambda p: p == LIB)  # found: preloaded instead
    assert not openblas_missing({}, "darwin", True, exists=lambda p: False)
    assert not openblas_missing({}, "linux", False, exists=lambda p: False)  # MLX on a GPU
    assert not openblas_missing({DISABLE_ENV: "1"}, "linux", True, exists=lambda p: False)
    assert not openblas_missing({GUARD_ENV: "1"}, "linux", True, exists=lambda p: False)  # the re-run child
    assert "30x slower" in NO_OPENBLAS_HINT and "apt install libopenblas0-pthread" in NO_OPENBLAS_HINT
    assert "\n" not in NO_OPENBLAS_HINT


def test_candidates_cover_debian_and_fedora():
    assert LIB in OPENBLAS_PATHS and "/usr/lib64/libopenblas.so.0" in OPENBLAS_PATHS


CHILD = (
    "import os; from qwen2_mlx.runtime.blas import ensure_openblas; ensure_openblas(); "
    "print('LD_PRELOAD=' + os.environ.get('LD_PRELOAD', ''))"
)


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", DISABLE_ENV, GUARD_ENV)}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists(LIB),
    reason="needs Linux with Debian's libopenblas0-pthread (installed by .ci/run)",
)
def test_real_reexec_preloads_openblas_once():
    import mlx.core as mx

    if mx.default_device().type != mx.cpu:
        pytest.skip("MLX runs on a GPU here: no re-exec by design")
    r = _run({})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"LD_PRELOAD={LIB}"
    assert r.stderr.count("re-running with OpenBLAS") == 1
    off = _run({DISABLE_ENV: "1"})
    assert off.stdout.strip() == "LD_PRELOAD=" and "OpenBLAS" not in off.stderr
