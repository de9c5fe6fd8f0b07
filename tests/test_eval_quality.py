"""`python -m qwen2_mlx.eval quality`: perplexity, next-token agreement and KL against a reference, and size.

Checked against a direct computation over the full logits; the dequantized float path the CPU uses
by default against MLX's quantized kernels; the table mode and its resumable rows; bad input.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from tiny import DENSE, make_checkpoint

from qwen2_mlx.eval.__main__ import main
from qwen2_mlx.eval.quality import TEXT, compare, dequantize_quantized, final_hidden, parameter_count
from qwen2_mlx.runtime.blas import mlx_uses_cpu

ON_CPU = mlx_uses_cpu()  # the quality command dequantizes quantized layers only there (GPUs run the kernels)

SHORT = "Hello, 世界! def f(x):\n    return x + 1\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from qwen2_mlx.convert.cli import run

    root = tmp_path_factory.mktemp("quality")
    hf, _ = make_checkpoint(root / "hf", DENSE)
    q4 = root / "q4"
    assert run(["--hf-path", str(hf), "--mlx-path", str(q4), "-q", "--q-bits", "4", "--q-group-size", "32"]) == 0
    return hf, q4


def _run(capsys, *argv):
    code = main(["quality", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_identical_models_agree_on_every_token(folders, tmp_path, capsys):
    hf, _ = folders
    code, out, _ = _run(capsys, "--model", hf, "--reference", hf, "--json", tmp_path / "r.json")
    assert code == 0, out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["agreement"] == 1.0 and r["kl"] < 1e-6
    assert r["perplexity"] == pytest.approx(r["reference_perplexity"], rel=1e-6)
    assert r["scored"] == r["tokens"] - 1 > 1000  # the built-in text: English, Chinese and code
    assert r["dequantized_layers"] == 0 and "next-token agreement: 100.00%" in out


def test_quantized_model_figures_match_a_direct_computation(folders, tmp_path, capsys):
    """Chunked head, hidden states through the cache: the same numbers as full logits of one forward."""
    from qwen2_mlx import load

    hf, q4 = folders
    text = tmp_path / "t.txt"
    text.write_text(TEXT.read_text(encoding="utf-8")[:1200], encoding="utf-8")
    code, out, err = _run(
        capsys,
        "--model",
        q4,
        "--reference",
        hf,
        "--text",
        text,
        "--json",
        tmp_path / "r.json",
        "--prefill-step-size",
        7,
    )
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    a, tok = load(q4, dtype=mx.float32)
    b, _ = load(hf, dtype=mx.float32)
    ids = tok.encode(text.read_text(encoding="utf-8"), add_special_tokens=False)
    x = mx.array([ids])
    la, lb = (np.array(m(x)[0, :-1].astype(mx.float32), dtype=np.float64) for m in (a, b))
    lpa = la - np.log(np.exp(la - la.max(-1, keepdims=True)).sum(-1, keepdims=True)) - la.max(-1, keepdims=True)
    lpb = lb - np.log(np.exp(lb - lb.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lb.max(-1, keepdims=True)
    t = np.array(ids[1:])
    kl = (np.exp(lpb) * (lpb - lpa)).sum(-1)
    assert r["tokens"] == len(ids)
    assert r["agreement"] == pytest.approx((la.argmax(-1) == lb.argmax(-1)).mean(), abs=1.5 / len(t))
    assert 0.3 < r["agreement"] < 1.0  # 4 bits on a random tiny model: a real, partial agreement
    assert r["kl"] == pytest.approx(kl.mean(), rel=2e-3) and r["kl"] > 1e-3
    assert r["kl_max"] == pytest.approx(kl.max(), rel=2e-3)
    assert r["perplexity"] == pytest.approx(math.exp(-lpa[np.arange(len(t)), t].mean()), rel=1e-4)
    assert r["reference_perplexity"] == pytest.approx(math.exp(-lpb[np.arange(len(t)), t].mean()), rel=1e-4)
    # 4 bits + two float32 scale/bias values per 32 weights = 6 bits, plus the float norms and the file header.
    assert r["dequantized_layers"] == (16 if ON_CPU else 0) and ("dequantized to float32" in out) == ON_CPU
    assert 6.0 <= r["size"]["bits_per_weight"] < 6.6
    assert r["size"]["disk_bytes"] < sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 4


def test_dequantized_path_equals_the_quantized_kernels(folders, tmp_path, capsys):
    """What makes the CPU default honest: same top-1 and logits within 2e-3 as MLX's quantized matmuls."""
    from qwen2_mlx import load

    hf, q4 = folders
    q, tok = load(q4, dtype=mx.float32)
    ids = tok.encode(SHORT, add_special_tokens=False)
    n_params = parameter_count(q)
    real = q(mx.array([ids]))[0]
    assert dequantize_quantized(q) == 16
    assert parameter_count(q) == n_params  # the packed weights count as the floats they hold
    deq = q(mx.array([ids]))[0]
    np.testing.assert_array_equal(np.array(mx.argmax(real, -1)), np.array(mx.argmax(deq, -1)))
    np.testing.assert_allclose(np.array(deq), np.array(real), atol=2e-3, rtol=1e-3)
    # and the command line's two paths give the same figures
    text = tmp_path / "short.txt"
    text.write_text(SHORT * 3, encoding="utf-8")
    figures = []
    for extra in ([], ["--quantized-kernels"]):
        code, out, err = _run(capsys, "--model", q4, "--reference", hf, "--text", text, *extra)
        assert code == 0, err
        figures.append(out)
    assert ("dequantized to float32" in figures[0]) == ON_CPU and "dequantized to float32" not in figures[1]
    line = [ln for ln in figures[0].splitlines() if ln.startswith("next-token agreement")]
    assert line and line[0] in figures[1]


def test_compare_is_chunk_independent(folders):
    from qwen2_mlx import load

    hf, _ = folders
    m, tok = load(hf, dtype=mx.float32)
    ids = tok.encode(SHORT * 4, add_special_tokens=False)
    h = final_hidden(m, ids, prefill_step_size=5)
    np.testing.assert_allclose(np.array(h), np.array(final_hidden(m, ids)), atol=1e-4)
    assert compare(m, h, m, h, ids, chunk=3)["agreement"] == 1.0


def test_table_rows_and_resume(folders, tmp_path, capsys, monkeypatch):
    hf, _ = folders
    results, out_json, text = tmp_path / "rows.jsonl", tmp_path / "table.json", tmp_path / "t.txt"
    text.write_text(SHORT * 4, encoding="utf-8")
    argv = ["--reference", hf, "--text", text, "--table", "--variants", "float32,bfloat16,4-bit g32,mixed_4_6_e8 g32"]
    code, out, err = _run(capsys, *argv, "--results", results, "--json", out_json)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert list(rows) == ["float32", "bfloat16", "4-bit g32", "mixed_4_6_e8 g32"]
    assert rows["float32"]["agreement"] == 1.0 and rows["float32"]["kl"] == 0.0
    assert rows["bfloat16"]["size_bytes"] < rows["float32"]["size_bytes"] * 0.55
    q4, mixed = rows["4-bit g32"], rows["mixed_4_6_e8 g32"]
    assert (q4["bits"], q4["group_size"], q4["recipe"], q4["dtype"]) == (4, 32, None, "bfloat16")
    assert mixed["recipe"] == "mixed_4_6_e8" and mixed["size_bytes"] > q4["size_bytes"]
    assert "| 4-bit g32 |" in out and "| float32 (reference) |" in out
    # The quantized row equals a one-model comparison of the same conversion.
    from qwen2_mlx.convert.cli import run

    folder = tmp_path / "q4"
    assert (
        run(["--hf-path", str(hf), "--mlx-path", str(folder), "-q", "--q-group-size", "32", "--dtype", "bfloat16"]) == 0
    )
    capsys.readouterr()
    code, _, _ = _run(capsys, "--model", folder, "--reference", hf, "--text", text, "--json", tmp_path / "one.json")
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["agreement"] == q4["agreement"] and one["kl"] == pytest.approx(q4["kl"], rel=1e-6)
    assert one["size"]["disk_bytes"] == q4["size_bytes"]
    # A second run reads the finished rows instead of converting again.
    import qwen2_mlx.convert.converter as converter

    monkeypatch.setattr(converter, "convert", lambda *a, **k: pytest.fail("converted a finished row again"))
    code, out2, err = _run(capsys, *argv, "--results", results)
    assert code == 0, err
    assert out2.splitlines()[:6] == out.splitlines()[:6]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "{nope}", "--reference", "{hf}"], "--model"),
        (["--model", "{hf}", "--reference", "{nope}"], "no such model folder"),
        (["--model", "{hf}", "--reference", "{other}"], "vocabulary sizes differ"),
        (["--model", "{hf}", "--reference", "{hf}", "--table"], "either --model"),
        (["--reference", "{hf}"], "either --model"),
        (["--reference", "{hf}", "--table", "--variants", "5-bit"], "unknown row '5-bit'"),
        (["--model", "{hf}", "--reference", "{hf}", "--text", "{nope}"], "no such text file"),
        (["--model", "{hf}", "--reference", "{hf}", "--json", "{hf}"], "is a folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(folders, tmp_path_factory, tmp_path, capsys, argv, message):
    hf, _ = folders
    other = tmp_path_factory.getbasetemp() / "quality-other"
    if not other.exists():
        make_checkpoint(other, DENSE, vocab_size=384)
        capsys.readouterr()
    names = {"hf": hf, "nope": tmp_path / "nope", "other": other}
    code, out, err = _run(capsys, *(a.format(**names) for a in argv))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
