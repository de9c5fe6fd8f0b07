"""Streaming: converting a multi-shard checkpoint keeps peak memory near one shard plus one tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import DENSE, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20


def _synthetic_checkpoint(path: Path) -> tuple[int, int]:
    """A float32 Qwen2 checkpoint of ~400 MB in one safetensors file per layer; returns (total, largest) bytes."""
    import mlx.core as mx

    cfg = dict(
        DENSE,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=8192,
    )
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(path, 512)
    h, f, v, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], 2 * 128
    total = largest = 0

    def save(name, tensors):
        nonlocal total, largest
        mx.eval(tensors)
        total += sum(t.nbytes for t in tensors.values())
        largest = max([largest] + [t.nbytes for t in tensors.values()])
        mx.save_safetensors(str(path / name), tensors)

    key = mx.random.key(0)
    save(
        "model-embed.safetensors",
        {
            "model.embed_tokens.weight": mx.random.normal((v, h), key=key),
            "model.norm.weight": mx.ones((h,)),
            "lm_head.weight": mx.random.normal((v, h), key=key) * 0.03,
        },
    )
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        r = lambda *s, i=i: mx.random.normal(s, key=mx.random.key(i)) * 0.03  # noqa: E731
        save(
            f"model-layer{i}.safetensors",
            {
                p + "self_attn.q_proj.weight": r(h, h),
                p + "self_attn.q_proj.bias": r(h),
                p + "self_attn.k_proj.weight": r(kv, h),
                p + "self_attn.k_proj.bias": r(kv),
                p + "self_attn.v_proj.weight": r(kv, h),
                p + "self_attn.v_proj.bias": r(kv),
                p + "self_attn.o_proj.weight": r(h, h),
                p + "mlp.gate_proj.weight": r(f, h),
                p + "mlp.up_proj.weight": r(f, h),
                p + "mlp.down_proj.weight": r(h, f),
                p + "input_layernorm.weight": mx.ones((h,)),
                p + "post_attention_layernorm.weight": mx.ones((h,)),
            },
        )
    return total, largest


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    src = tmp_path_factory.mktemp("synthetic") / "src"
    total, largest = _synthetic_checkpoint(src)
    return src, total, largest


def _peak_rss_of(argv: list[str]) -> int:
    """Peak RSS (bytes) of a converter child process, via a wrapper whose only child it is."""
    wrapper = (
        "import resource, subprocess, sys; "
        "rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if rc == 0 else -1)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    kb = int(out.stdout.strip().splitlines()[-1])
    assert kb > 0, out.stderr
    return kb * 1024


@pytest.mark.slow
def test_peak_memory_is_one_shard_plus_one_tensor(tmp_path, synthetic):
    src, total, largest = synthetic
    shard = 32 * MB
    convert = [
        sys.executable,
        str(ROOT / "convert.py"),
        "--hf-path",
        str(src),
        "--dtype",
        "float32",
        "--max-shard-size",
        str(shard),
    ]
    # The same command on a tiny checkpoint measures the fixed cost (interpreter, MLX, imports).
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps(DENSE))
    write_tokenizer(tiny, 512)
    import mlx.core as mx

    mx.save_safetensors(str(tiny / "model.safetensors"), {k: mx.zeros(s) for k, s in _tiny_shapes(DENSE).items()})
    base = _peak_rss_of(convert[:3] + [str(tiny)] + convert[4:] + ["--mlx-path", str(tmp_path / "o1")])
    peak = _peak_rss_of(convert + ["--mlx-path", str(tmp_path / "o2")])
    shards = sorted((tmp_path / "o2").glob("model-*.safetensors"))
    assert len(shards) >= total // shard
    extra = peak - base
    bound = shard + 4 * largest
    print(
        f"\nmodel {total / MB:.0f} MB, largest tensor {largest / MB:.0f} MB, shard {shard / MB:.0f} MB: "
        f"peak RSS {peak / MB:.0f} MB = fixed {base / MB:.0f} MB + {extra / MB:.0f} MB (bound {bound / MB:.0f} MB)"
    )
    assert extra <= bound, (extra, bound)
    assert extra < total / 2


def _tiny_shapes(cfg: dict) -> dict:
    from mlx.utils import tree_flatten

    from qwen2_mlx.models.config import ModelArgs
    from qwen2_mlx.models.model import Model

    return {k: v.shape for k, v in tree_flatten(Model(ModelArgs.from_dict(cfg)).parameters())}


@pytest.mark.slow
def test_killed_runs_leave_no_folder(tmp_path, synthetic):
    """SIGTERM mid-write removes the temporary folder; after a SIGKILL the next run clears it."""
    import signal
    import time

    src = synthetic[0]
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "convert.py"),
        "--hf-path",
        str(src),
        "--mlx-path",
        str(out),
        "--dtype",
        "float32",
        "--max-shard-size",
        "8MB",
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    def start_and_wait_for_shards():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if any(p.glob("shard-*.safetensors") for p in tmp_path.glob(".out.partial-*")):
                return proc
            time.sleep(0.05)
        proc.kill()
        pytest.fail("the converter never started writing shards")

    proc = start_and_wait_for_shards()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "nothing was written" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))

    proc = start_and_wait_for_shards()
    proc.kill()
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".out.partial-*"))  # SIGKILL cannot clean up...
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert out.is_dir() and not list(tmp_path.glob(".out.*"))  # ...the next run does
