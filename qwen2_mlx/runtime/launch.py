"""`qwen2-run COMMAND ...`: start any program with OpenBLAS preloaded on a Linux CPU (scripts, Jupyter).

The entry points re-run themselves with OpenBLAS (`blas.py`), but `python script.py` or `jupyter lab`
cannot: a library is preloaded only when a process starts. `qwen2-run python script.py` or
`qwen2-run jupyter lab` sets `LD_PRELOAD` the same way and replaces itself with the command, so
notebook kernels started from that Jupyter inherit it too. Elsewhere (a Mac, a GPU) it only runs it.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from .blas import NO_OPENBLAS_HINT, mlx_uses_cpu, openblas_missing, openblas_to_preload

USAGE = "usage: qwen2-run COMMAND [ARGS...]   e.g. qwen2-run python script.py, qwen2-run jupyter lab"


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    env = dict(os.environ)
    if sys.platform.startswith("linux"):
        cpu = mlx_uses_cpu()
        lib = openblas_to_preload(env, sys.platform, cpu)
        if lib is not None:
            env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
        elif openblas_missing(env, sys.platform, cpu):
            print(NO_OPENBLAS_HINT, file=sys.stderr)
    try:
        os.execvpe(args[0], args, env)
    except OSError as e:
        print(f"qwen2-run: cannot run {args[0]}: {e.strerror or e}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
