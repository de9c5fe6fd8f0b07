"""Resumable results files: one JSON line of settings, then one JSON line per finished unit.

A long run (a NIAH grid, many passkey trials, perplexity windows) appends each unit as soon as it
is done, so an interrupted run loses at most the unit in flight. Re-running with the same file
skips the units already there; a file written with other settings is refused, naming the first
setting that differs, because mixing them would silently corrupt the figures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

FORMAT = "qwen2_mlx.eval/1"


class ResultsError(ValueError):
    """A results file that cannot be used for this run; the message names the file."""


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def _first_difference(old: dict, new: dict) -> Optional[str]:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: file has {json.dumps(old.get(key))}, this run has {json.dumps(new.get(key))}"
    return None


class ResultsFile:
    """Append-only store of finished units keyed by id; `None` path keeps them in memory only."""

    def __init__(self, path: Optional[Union[str, Path]], settings: dict):
        self.path = Path(path) if path else None
        self.settings = _canonical(settings)
        self.done: dict[str, dict] = {}
        if self.path is None:
            return
        if self.path.is_dir():
            raise ResultsError(f"{self.path}: is a folder; --results needs a file")
        if self.path.exists() and self.path.stat().st_size > 0:
            self._read()
        else:
            if not self.path.parent.is_dir():
                raise ResultsError(f"{self.path}: folder {self.path.parent} does not exist")
            self._append({"format": FORMAT, "settings": self.settings})

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            raise ResultsError(f"{self.path}: not a qwen2_mlx.eval results file (first line is not JSON)") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ResultsError(f"{self.path}: not a qwen2_mlx.eval results file (no '{FORMAT}' header)")
        diff = _first_difference(header.get("settings") or {}, self.settings)
        if diff:
            raise ResultsError(f"{self.path}: made with different settings ({diff}); use another --results file")
        for n, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # a run killed mid-write leaves a torn last line: redo that unit
                    break
                raise ResultsError(f"{self.path}: line {n} is not JSON") from None
            if not isinstance(record, dict) or "id" not in record:
                raise ResultsError(f"{self.path}: line {n} has no 'id'")
            self.done[str(record["id"])] = record
        if lines and not self.path.read_bytes().endswith(b"\n"):
            # Drop the torn line so the next append starts on a fresh line.
            good = "\n".join(lines[:1] + [json.dumps(r, sort_keys=True) for r in self.done.values()]) + "\n"
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(good, encoding="utf-8")
            os.replace(tmp, self.path)

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __contains__(self, unit_id: str) -> bool:
        return unit_id in self.done

    def get(self, unit_id: str) -> Optional[dict]:
        return self.done.get(unit_id)

    def add(self, record: dict) -> dict:
        """Record a finished unit (a dict with an 'id')."""
        record = _canonical(record)
        self.done[str(record["id"])] = record
        if self.path is not None:
            self._append(record)
        return record


def write_json(path: Union[str, Path], data: Any) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
