"""Read a local Hugging Face or MLX checkpoint folder (config.json + safetensors) as a converter source.

Every safetensors header is checked before anything is converted (a truncated or corrupt file is
reported by name), then the files are opened lazily with `mx.load`: a tensor is read from disk only
when the writer evaluates it. Weight names go through `Model.sanitize`, the same mapping the
loader uses (per-expert tensors are stacked lazily into mlx-lm's `switch_mlp` layout).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import mlx.core as mx

from qwen2_mlx.models.config import ConfigError, ModelArgs

from .errors import ConvertError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
_ST_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def read_safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, after checking that the data it describes is all there."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 << 20:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= d
            if info["dtype"] not in _ST_DTYPES or stop - start != count * _ST_DTYPES[info["dtype"]]:
                raise ValueError(f"tensor {name} has an inconsistent size or unknown dtype {info['dtype']}")
            end = max(end, stop)
        if 8 + n + end > size:
            raise ValueError(f"truncated: tensor data needs {8 + n + end} bytes, the file has {size}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    return header


def read_config(path: Path) -> tuple[dict, ModelArgs]:
    """The raw config.json dict and its validated ModelArgs (ConfigError names file and field)."""
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ConvertError(f"{cfg_path}: file not found (a model folder needs config.json)")
    try:
        args = ModelArgs.from_file(cfg_path)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    return json.loads(cfg_path.read_text(encoding="utf-8")), args


class FolderSource:
    """A local checkpoint folder: Hugging Face (float) or MLX (float or quantized)."""

    kind = "folder"

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise ConvertError(f"{self.path}: no such folder")
        if not self.path.is_dir():
            raise ConvertError(f"{self.path}: is a file; expected a model folder (for a GGUF file use --gguf)")
        raw, self.args = read_config(self.path)
        qc = raw.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method"):
            raise ConvertError(
                f"{self.path / 'config.json'}: field 'quantization_config': checkpoints quantized "
                f"with {qc['quant_method']!r} are not supported; use the float checkpoint or a GGUF file"
            )
        self.quantization: Optional[dict] = raw.get("quantization")
        for key in ("quantization", "quantization_config", "_name_or_path"):
            raw.pop(key, None)
        self.config = raw
        self.files = sorted(self.path.glob("*.safetensors"))
        if not self.files:
            raise ConvertError(f"{self.path}: no *.safetensors weight files found")
        if not (self.path / "tokenizer.json").exists():
            raise ConvertError(f"{self.path / 'tokenizer.json'}: file not found (a model folder needs tokenizer.json)")
        for f in self.files:
            read_safetensors_header(f)
        lazy = {}
        for f in self.files:
            try:
                lazy.update(mx.load(str(f)))
            except Exception as e:  # mx.load raises RuntimeError/ValueError on damaged files
                raise ConvertError(f"{f}: cannot be read as safetensors ({e})") from None
        from qwen2_mlx.models.model import Model

        self._weights = Model(self.args).sanitize(lazy)

    def tensor_names(self) -> list[str]:
        return list(self._weights)

    def shape(self, name: str) -> tuple:
        return tuple(self._weights[name].shape)

    def dtype(self, name: str) -> mx.Dtype:
        return self._weights[name].dtype

    def tensor(self, name: str) -> mx.array:
        return self._weights[name]

    def release(self, name: str) -> None:
        """Drop our reference once the writer has the tensor, so its memory goes with the shard."""
        self._weights.pop(name, None)

    def write_tokenizer(self, dest: Path) -> None:
        import shutil

        for name in TOKENIZER_FILES:
            src = self.path / name
            if src.exists():
                shutil.copyfile(src, Path(dest) / name)

    def tensors(self) -> Iterator[tuple[str, mx.array]]:
        for name in list(self._weights):
            yield name, self._weights.pop(name)
