"""Re-run a command-line program with OpenBLAS preloaded when MLX computes on a Linux CPU.

The `mlx-cpu` wheel bundles a reference BLAS; preloading OpenBLAS (its `cblas_sgemm` wins symbol
lookup) makes float32 prefill about 27x faster. A library can only be preloaded at process start,
so the entry points call `ensure_openblas(argv)` first thing in `main(argv=None)`, which re-executes
the process once with `LD_PRELOAD` set, before anything imports MLX (the decision reads the
installed packages, not MLX). Without OpenBLAS it says once what it costs and which package gives it.
`QWEN2_MLX_NO_OPENBLAS=1` turns this off. The test run does the same (`pytest_openblas.py`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Optional

DISABLE_ENV = "QWEN2_MLX_NO_OPENBLAS"
# Set in the child so that a failed preload can never make the program re-execute itself again.
GUARD_ENV = "QWEN2_MLX_OPENBLAS_REEXEC"

# Debian/Ubuntu (libopenblas0-pthread, libopenblas0-openmp, libopenblas0) and Fedora/RHEL (openblas).
OPENBLAS_PATHS: tuple[str, ...] = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def openblas_to_preload(
    environ: Mapping[str, str],
    platform: str,
    cpu_backend: bool,
    exists: Callable[[str], bool] = os.path.exists,
    candidates: Sequence[str] = OPENBLAS_PATHS,
) -> Optional[str]:
    """The OpenBLAS library to preload, or None when the process should run as it is.

    Pure decision: Linux, MLX on its CPU backend, not turned off, not already re-executed,
    no OpenBLAS in LD_PRELOAD yet, and a library found at one of `candidates`.
    """
    if not platform.startswith("linux") or not cpu_backend:
        return None
    if environ.get(DISABLE_ENV, "").strip() not in ("", "0") or environ.get(GUARD_ENV):
        return None
    preload = environ.get("LD_PRELOAD", "")
    if "openblas" in preload.lower() or any(c in preload for c in candidates):
        return None
    return next((c for c in candidates if exists(c)), None)


def mlx_uses_cpu() -> bool:
    """True when MLX will compute on the CPU, decided without importing MLX.

    Linux wheels: `mlx[cpu]` brings `mlx-cpu`, `mlx[cuda…]` brings `mlx-cuda-…`; a CUDA build without
    an NVIDIA device (no /dev/nvidiactl) falls back to the CPU as well.
    """
    from importlib import metadata

    cuda = any(
        (d.metadata.get("Name") or "").lower().replace("_", "-").startswith("mlx-cuda")
        for d in metadata.distributions()
    )
    return not (cuda and os.path.exists("/dev/nvidiactl"))


NO_OPENBLAS_HINT = (
    "qwen2-mlx: MLX runs on the CPU without OpenBLAS, so float32 is about 30x slower; install it "
    "with `sudo apt install libopenblas0-pthread` (Debian/Ubuntu) or `sudo dnf install openblas` "
    f"(Fedora); {DISABLE_ENV}=1 hides this line"
)


def openblas_missing(
    environ: Mapping[str, str], platform: str, cpu_backend: bool, exists: Callable[[str], bool] = os.path.exists
) -> bool:
    """True when OpenBLAS would be preloaded here but none is installed (say so: it costs ~30x)."""
    wanted = openblas_to_preload(environ, platform, cpu_backend, exists=lambda _: True) is not None
    return wanted and openblas_to_preload(environ, platform, cpu_backend, exists=exists) is None


def ensure_openblas(main_argv: Optional[Sequence[str]] = None) -> None:
    """Re-execute this process with OpenBLAS preloaded when that makes MLX faster; else return.

    Call it first thing in a command-line `main(argv=None)`, passing `argv`: a list means main() was
    called from Python (tests, other programs), and such a process is never replaced.
    """
    if main_argv is not None or not sys.platform.startswith("linux") or os.environ.get(GUARD_ENV):
        return  # cheap exits before importing MLX
    if {"-h", "--help"} & set(sys.argv[1:]):
        return  # help multiplies no matrices: neither a re-run nor a line about it
    cpu = mlx_uses_cpu()
    lib = openblas_to_preload(os.environ, sys.platform, cpu)
    if lib is None:
        if openblas_missing(os.environ, sys.platform, cpu):
            print(NO_OPENBLAS_HINT, file=sys.stderr)
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
    env[GUARD_ENV] = "1"
    args = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    print(
        f"qwen2-mlx: MLX runs on the CPU; re-running with OpenBLAS preloaded ({lib}) for fast "
        f"float32 matmul (set {DISABLE_ENV}=1 to turn this off)",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, args, env)
    except OSError as e:  # keep running with the bundled BLAS rather than fail
        print(f"qwen2-mlx: could not re-run with OpenBLAS ({e}); continuing without it", file=sys.stderr)
