"""Write an MLX model folder atomically, one tensor at a time.

Everything goes into a hidden temporary folder beside the target (same filesystem, so the final
rename is atomic); the target appears only when the whole model is written. Tensors are added one
by one and a safetensors shard is flushed as soon as it is full, so peak memory is about one shard
plus the tensor being converted. Shards and index follow mlx-lm's layout (`model.safetensors` or
`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .errors import ConvertError

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
_PARTIAL = ".partial-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: Path) -> None:
    """Remove temporary folders left beside `target` by converter runs that were killed (SIGKILL)."""
    prefix = f".{target.name}{_PARTIAL}"
    for p in target.parent.glob(prefix + "*"):
        pid = p.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def check_target(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise ConvertError(f"{target}: already exists (choose another --mlx-path or add --force to replace it)")
    if target.exists() and not target.is_dir():
        raise ConvertError(f"{target}: exists and is not a folder")


def check_disk_space(target: Path, needed: int) -> None:
    """Refuse early when the target's filesystem cannot hold the output (plus 2% and 16 MB slack)."""
    parent = _existing_parent(target)
    free = shutil.disk_usage(parent).free
    want = int(needed * 1.02) + (16 << 20)
    if free < want:
        raise ConvertError(
            f"not enough disk space in {parent}: the model needs {format_size(want)}, {format_size(free)} is free"
        )


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


class ModelWriter:
    """`with ModelWriter(target) as w: w.add(name, array) ...; w.write_json(...)`; committed on success."""

    def __init__(self, target: str | Path, force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.target = Path(target).expanduser().absolute()
        self.force = force
        self.max_shard_bytes = max_shard_bytes
        self.tmp: Optional[Path] = None
        self._shard: dict[str, mx.array] = {}
        self._shard_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0
        self._old_sigterm = None

    # --- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> ModelWriter:
        check_target(self.target, self.force)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.target)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}{_PARTIAL}{os.getpid()}-", dir=self.target.parent))
        # SIGTERM unwinds like Ctrl-C, so the temporary folder is removed on the way out.
        try:
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        except ValueError:  # not the main thread
            self._old_sigterm = None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
            if self.tmp is not None and self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)

    # --- content --------------------------------------------------------------------------------
    def add(self, name: str, array: mx.array) -> None:
        """Evaluate one tensor and add it to the current shard, flushing the shard first if full."""
        mx.eval(array)
        if self._shard and self._shard_bytes + array.nbytes > self.max_shard_bytes:
            self.flush()
        self._shard[name] = array
        self._shard_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def flush(self) -> None:
        if not self._shard:
            return
        path = self.tmp / f"shard-{len(self._shards):05d}.safetensors"
        mx.save_safetensors(str(path), self._shard, metadata={"format": "mlx"})
        self._shards.append(sorted(self._shard))
        self._shard, self._shard_bytes = {}, 0

    def write_json(self, name: str, obj: dict) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")

    def copy(self, src: Path, name: Optional[str] = None) -> None:
        shutil.copyfile(src, self.tmp / (name or Path(src).name))

    @property
    def folder(self) -> Path:
        """The temporary folder being written (for files produced by other libraries)."""
        return self.tmp

    # --- commit ---------------------------------------------------------------------------------
    def _commit(self) -> None:
        self.flush()
        n = len(self._shards)
        if n == 0:
            raise ConvertError("no tensors were written")
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / f"shard-{i:05d}.safetensors", self.tmp / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            self.write_json(
                "model.safetensors.index.json",
                {
                    "metadata": {"total_size": self.total_bytes},
                    "weight_map": dict(sorted(weight_map.items())),
                },
            )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a model folder is an ordinary folder
        old = None
        if self.target.exists():  # --force: move the old folder aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
            os.replace(self.target, old / "model")
        os.replace(self.tmp, self.target)
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
