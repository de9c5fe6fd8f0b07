"""Bad input: one clear line on stderr, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny import DENSE, make_checkpoint
from tiny_gguf import write_gguf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path, _ = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "hf", DENSE)
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, ckpt) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", ckpt, DENSE)


def run_cli(capsys, *argv):
    from qwen2_mlx.convert.cli import run

    code = run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, out_dir: Path, *words):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")], "partial folder left"


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_paths(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--gguf", tmp_path / "nope.gguf", "--mlx-path", out)
    assert_refused(code, err, out, "nope.gguf", "no such file")
    code, _, err = run_cli(capsys, "--hf-path", tmp_path / "no" / "such" / "folder", "--mlx-path", out)
    assert_refused(code, err, out, "no such folder")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-gguf"])
def test_damaged_gguf(tmp_path, capsys, gguf_file, damage):
    bad = tmp_path / "bad.gguf"
    data = gguf_file.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
        words = ("bad.gguf", "truncated")
    elif damage == "garbage":
        bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
        words = ("bad.gguf", "corrupt")
    else:
        bad.write_bytes(b"PK\x03\x04 this is a zip file")
        words = ("bad.gguf", "not a GGUF file")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--gguf", bad, "--mlx-path", out)
    assert_refused(code, err, out, *words)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors(tmp_path, capsys, ckpt, damage):
    folder = copy_folder(ckpt, tmp_path / "hf")
    st = next(folder.glob("*.safetensors"))
    data = st.read_bytes()
    st.write_bytes(data[: len(data) - 1000] if damage == "truncated" else b"\xff" * 64)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--hf-path", folder, "--mlx-path", out)
    assert_refused(code, err, out, st.name, "safetensors")


def test_config_not_json(tmp_path, capsys, ckpt):
    folder = copy_folder(ckpt, tmp_path / "hf")
    (folder / "config.json").write_text('{"model_type": "qwen2",')
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--hf-path", folder, "--mlx-path", out)
    assert_refused(code, err, out, "config.json", "not valid JSON")


def test_config_missing_field(tmp_path, capsys, ckpt):
    folder = copy_folder(ckpt, tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["num_attention_heads"]
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--hf-path", folder, "--mlx-path", out)
    assert_refused(code, err, out, "config.json", "num_attention_heads", "missing")


def test_unsupported_architecture_config(tmp_path, capsys, ckpt):
    folder = copy_folder(ckpt, tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--hf-path", folder, "--mlx-path", out)
    assert_refused(code, err, out, "model_type", "llama")


def test_unsupported_architecture_gguf(tmp_path, capsys, ckpt):
    llama = write_gguf(tmp_path / "llama.gguf", ckpt, DENSE, arch="llama")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--gguf", llama, "--mlx-path", out)
    assert_refused(code, err, out, "llama.gguf", "unsupported architecture", '"llama"')


def test_weights_not_matching_config(tmp_path, capsys, ckpt):
    folder = copy_folder(ckpt, tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--hf-path", folder, "--mlx-path", out)
    assert_refused(code, err, out, "missing", "model.layers.2")


def test_not_enough_disk_space(tmp_path, capsys, ckpt, monkeypatch):
    import qwen2_mlx.convert.writer as writer

    real = shutil.disk_usage
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--hf-path", ckpt, "--mlx-path", out)
    assert_refused(code, err, out, "not enough disk space", "free")


def test_existing_target_refused_unless_force(tmp_path, capsys, ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "--hf-path", ckpt, "--mlx-path", out)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").exists()
    code, _, err = run_cli(capsys, "--hf-path", ckpt, "--mlx-path", out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_quantize_and_dequantize_together(tmp_path, capsys, ckpt):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--hf-path", ckpt, "--mlx-path", out, "-q", "-d")
    assert_refused(code, err, out, "--dequantize")


def _http_error(cls, status):
    import importlib

    from huggingface_hub.errors import Response

    http = importlib.import_module(Response.__module__.split(".")[0])  # httpx or httpx2, whichever the hub uses
    response = http.Response(status, request=http.Request("GET", "https://huggingface.co/api/models/x/y"))
    return cls(f"{status} error", response=response)


@pytest.mark.parametrize(
    "failure,words",
    [
        ("unreachable", ("cannot reach the Hugging Face hub", "--gguf", "LOCAL_FOLDER")),
        ("not-found", ("repo not found", "HF_TOKEN")),
        ("gated", ("gated", "HF_TOKEN", "--gguf")),
    ],
)
def test_hub_failures(tmp_path, capsys, monkeypatch, failure, words):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def model_info(self, repo_id, **kw):
        if failure == "unreachable":
            raise ConnectionError("[Errno -2] Name or service not known")
        raise _http_error(
            RepositoryNotFoundError if failure == "not-found" else GatedRepoError,
            404 if failure == "not-found" else 403,
        )

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", model_info)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--hf-path", "someorg/some-model", "--mlx-path", out)
    assert_refused(code, err, out, "someorg/some-model", *words)


def test_failure_while_writing_leaves_nothing(tmp_path, capsys, ckpt, monkeypatch):
    """A crash after some shards are written (here: the 5th tensor) leaves no folder at all."""
    import qwen2_mlx.convert.writer as writer

    real_add, calls = writer.ModelWriter.add, []

    def failing_add(self, name, array):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_add(self, name, array)

    monkeypatch.setattr(writer.ModelWriter, "add", failing_add)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--hf-path", ckpt, "--mlx-path", out, "--max-shard-size", "1000")
    assert code == 130 and "nothing was written" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize(
    "opts,words",
    [
        (["--q-bits", "7"], ("--q-bits 7", "not supported")),
        (["--q-group-size", "48"], ("--q-group-size 48", "not supported")),
        (["--q-bits", "3", "--q-mode", "mxfp4"], ("mxfp4", "not supported")),
    ],
)
def test_unsupported_quantization_options(tmp_path, capsys, ckpt, opts, words):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--hf-path", ckpt, "--mlx-path", out, "-q", *opts)
    assert_refused(code, err, out, *words)
