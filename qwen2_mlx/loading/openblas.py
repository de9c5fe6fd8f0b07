"""Tell a library user, once, when MLX multiplies float32 matrices on a Linux CPU without OpenBLAS.

The command-line programs re-run themselves with OpenBLAS preloaded (`qwen2_mlx/runtime/blas.py`); a
script or a notebook that imports qwen2_mlx cannot (a library is only preloaded at process start),
so the first `load()` says how to start it that way: `qwen2-run python script.py`, or the apt command
when no OpenBLAS is installed. `QWEN2_MLX_NO_OPENBLAS=1` hides the line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Optional

from qwen2_mlx.runtime.blas import DISABLE_ENV, OPENBLAS_PATHS

INSTALL = "`sudo apt install libopenblas0-pthread` (Debian/Ubuntu) or `sudo dnf install openblas` (Fedora)"


def openblas_mapped(maps: str, candidates: Sequence[str] = OPENBLAS_PATHS) -> bool:
    """Whether a system OpenBLAS is mapped into the process (numpy's own `libscipy_openblas64_` is not
    one MLX can use: its symbols carry a prefix)."""
    files = {line.split()[-1] for line in maps.splitlines() if "/" in line}
    return any(f in candidates or os.path.basename(f).startswith("libopenblas") for f in files)


def library_hint(
    environ: Mapping[str, str],
    platform: str,
    cpu_backend: bool,
    maps: str,
    exists: Callable[[str], bool] = os.path.exists,
    candidates: Sequence[str] = OPENBLAS_PATHS,
) -> Optional[str]:
    """The one line to print, or None when OpenBLAS is loaded (`maps`: /proc/self/maps) or beside the point."""
    if not platform.startswith("linux") or not cpu_backend or openblas_mapped(maps, candidates):
        return None
    if environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return None
    lib = next((c for c in candidates if exists(c)), None)
    if lib is None:
        return (
            "qwen2-mlx: MLX computes on the CPU without OpenBLAS, so float32 prefill runs about 27x slower; install "
            f"it with {INSTALL}, then start Python with `qwen2-run python ...`; {DISABLE_ENV}=1 hides this line"
        )
    return (
        "qwen2-mlx: MLX computes on the CPU without OpenBLAS, so float32 prefill runs about 27x slower; start this "
        f"program as `qwen2-run python script.py` (or `LD_PRELOAD={lib} python script.py`), notebooks with "
        f"`qwen2-run jupyter lab`; {DISABLE_ENV}=1 hides this line"
    )


_said = False


def warn_once_without_openblas() -> None:
    """Print `library_hint` to stderr the first time a model is loaded in this process."""
    global _said
    if _said or not sys.platform.startswith("linux"):
        return
    _said = True
    import mlx.core as mx

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read()
    except OSError:
        return  # cannot tell: say nothing rather than something wrong
    hint = library_hint(os.environ, sys.platform, mx.default_device().type == mx.DeviceType.cpu, maps)
    if hint:
        print(hint, file=sys.stderr)
