"""Long-context evaluation: prompts, resumable results, the strided perplexity loop (against
transformers), the NIAH heatmap files, the CLI's errors, and the real model's passkey/perplexity."""

from __future__ import annotations

import json
import math
import random

import mlx.core as mx
import numpy as np
import pytest
from tiny import DENSE, make_checkpoint

from qwen2_mlx import load
from qwen2_mlx.eval.__main__ import main
from qwen2_mlx.eval.passkey import run_passkey
from qwen2_mlx.eval.ppl import perplexity, windows
from qwen2_mlx.eval.prompts import passkey_prompt, random_key
from qwen2_mlx.eval.results import ResultsError, ResultsFile
from qwen2_mlx.eval.retrieval import spread_depth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, torch_model = make_checkpoint(tmp_path_factory.mktemp("tiny") / "m", DENSE)
    return path, torch_model


@pytest.fixture(scope="module")
def tiny_loaded(tiny):
    return load(tiny[0], dtype=mx.float32)


# --- prompts --------------------------------------------------------------------------------


def test_spread_depths_cover_the_haystack_without_depending_on_trial_count():
    assert [spread_depth(i) for i in range(3)] == [0.5, 0.25, 0.75]
    assert sorted(spread_depth(i) for i in range(7)) == [k / 8 for k in range(1, 8)]


def test_passkey_prompt_fits_the_length_and_places_the_needle_by_depth(tiny_loaded):
    _, tok = tiny_loaded
    key = random_key(0, 0)
    assert len(key) == 5 and key == random_key(0, 0) and key != random_key(0, 1)
    starts = []
    for depth in (0.0, 0.5, 1.0):
        p = passkey_prompt(tok, 1500, depth, key)
        assert 1400 < len(p.tokens) <= 1500
        text = tok.decode(p.tokens)
        assert text.count(f"The pass key is {key}.") == 1
        assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\nThe pass key is")
        starts.append(p.needle_token)
    assert starts[0] < starts[1] < starts[2] < 1500
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(tok, 50, 0.5, key)


# --- results files --------------------------------------------------------------------------


def test_results_file_resumes_refuses_other_settings_and_survives_a_torn_line(tmp_path):
    f = tmp_path / "r.jsonl"
    r = ResultsFile(f, {"command": "passkey", "length": 100})
    r.add({"id": "trial:0", "ok": True})
    r.add({"id": "trial:1", "ok": False})
    with open(f, "a") as fh:
        fh.write('{"id": "trial:2", "o')  # killed mid-write
    again = ResultsFile(f, {"length": 100, "command": "passkey"})
    assert set(again.done) == {"trial:0", "trial:1"} and again.get("trial:1")["ok"] is False
    again.add({"id": "trial:2", "ok": True})
    lines = f.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    with pytest.raises(ResultsError, match="different settings.*length"):
        ResultsFile(f, {"command": "passkey", "length": 200})
    (tmp_path / "other.txt").write_text("hello\n")
    with pytest.raises(ResultsError, match="not a qwen2_mlx.eval results file"):
        ResultsFile(tmp_path / "other.txt", {})


def test_passkey_cli_resumes_and_appends_new_trials(tiny, tmp_path, capsys):
    results, js = tmp_path / "pk.jsonl", tmp_path / "pk.json"
    args = ["passkey", "--model", str(tiny[0]), "--length", "600", "--results", str(results)]
    assert main(args + ["--trials", "2"]) == 0
    first = results.read_text().splitlines()
    assert len(first) == 3
    assert main(args + ["--trials", "3", "--json", str(js)]) == 0
    second = results.read_text().splitlines()
    assert second[:3] == first and len(second) == 4  # two kept, one appended
    out = capsys.readouterr().out
    assert "accuracy: " in out and "trial 2: depth  75.0%" in out
    summary = json.loads(js.read_text())
    assert [t["trial"] for t in summary["trials"]] == [0, 1, 2]
    assert {"depth", "expected", "got", "ok"} <= set(summary["trials"][0])
    assert main(args + ["--trials", "3", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "seed" in err
    assert results.read_text().splitlines() == second


# --- NIAH -----------------------------------------------------------------------------------


def test_niah_2x2_grid_writes_png_and_json(tiny, tmp_path, capsys):
    import matplotlib.image as mpimg

    out = tmp_path / "grid.png"
    assert main(["niah", "--model", str(tiny[0]), "--lengths", "600,900", "--depths", "0,100", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    grid = json.loads(out.with_suffix(".json").read_text())
    assert grid["lengths"] == [600, 900] and grid["depths"] == [0, 100]
    assert len(grid["scores"]) == 2 and all(len(row) == 2 for row in grid["scores"])
    assert all(s in (0.0, 1.0) for row in grid["scores"] for s in row)
    assert len(grid["cells"]) == 4 and {c["id"] for c in grid["cells"]} == {
        "600:0:0",
        "600:100:0",
        "900:0:0",
        "900:100:0",
    }
    assert all(c["tokens"] <= c["length"] for c in grid["cells"])
    assert "DCA chunk 4096, local 512" in grid["title"]  # long context is on by default (the trained window)
    assert "accuracy: " in capsys.readouterr().out


def test_niah_title_names_the_dca_settings(tiny, tmp_path):
    out = tmp_path / "dca.png"
    assert (
        main(
            [
                "niah",
                "--model",
                str(tiny[0]),
                "--lengths",
                "600",
                "--depths",
                "50",
                "--out",
                str(out),
                "--dca-chunk-size",
                "256",
                "--dca-local-size",
                "32",
            ]
        )
        == 0
    )
    grid = json.loads(out.with_suffix(".json").read_text())
    assert "DCA chunk 256, local 32" in grid["title"]
    assert grid["settings"]["dca"] == {"chunk_size": 256, "local_size": 32, "original_max_position_embeddings": 0}


# --- perplexity -----------------------------------------------------------------------------


def test_windows_score_every_token_once():
    for n, context, stride in [(10, 4, 2), (100, 32, 32), (101, 32, 7), (5, 16, 8), (64, 64, 1)]:
        scored = []
        for begin, end, first in windows(n, context, stride):
            assert end - begin <= context
            scored += range(begin + first, end)
        # With overlap every token after the first is scored; without (stride == context) a window's
        # first token has no history and, as in Hugging Face's loop, is not scored.
        skipped = set(range(stride, n, stride)) if stride == context else set()
        assert scored == [i for i in range(1, n) if i not in skipped]


def test_strided_perplexity_matches_transformers(tiny, tiny_loaded):
    """Hugging Face's documented strided loop, run in torch on the same checkpoint."""
    import torch

    _, torch_model = tiny
    model, _ = tiny_loaded
    ids = random.Random(0).choices(range(DENSE["vocab_size"]), k=150)
    context, stride = 64, 24
    ours = perplexity(model, ids, context, stride, prefill_step_size=20)

    x = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, x.size(1), stride):
        end = min(begin + context, x.size(1))
        trg_len = end - prev_end
        input_ids = x[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = torch_model(input_ids, labels=target_ids).loss
        num_valid = (target_ids[:, 1:] != -100).sum().item()  # labels are shifted inside the model
        nll_sum += loss.item() * num_valid
        n_tokens += num_valid
        prev_end = end
        if end == x.size(1):
            break
    assert ours["scored_tokens"] == n_tokens == len(ids) - 1
    assert ours["perplexity"] == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-4)


# --- command-line errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["passkey", "--model", "{tmp}/nope", "--length", "100", "--trials", "1"], "no such model folder"),
        (["ppl", "--model", "{model}", "--file", "{tmp}/missing.txt"], "missing.txt: no such text file"),
        (["niah", "--model", "{model}", "--lengths", "1k,2k", "--out", "{tmp}/a.png"], "--lengths: expected"),
        (
            ["niah", "--model", "{model}", "--lengths", "600", "--depths", "0,150", "--out", "{tmp}/a.png"],
            "--depths: 150 is out of range",
        ),
        (["niah", "--model", "{model}", "--lengths", "600", "--out", "{tmp}/a.jpg"], "ending in .png"),
        (
            ["niah", "--model", "{model}", "--lengths", "20", "--out", "{tmp}/a.png"],
            "--lengths: length 20 is too short",
        ),
        (["passkey", "--model", "{model}", "--length", "1000", "--trials", "0"], "--trials must be positive"),
        (["ppl", "--model", "{model}", "--file", "{tmp}/t.txt", "--context", "8", "--stride", "9"], "--stride"),
        (
            ["passkey", "--model", "{model}", "--length", "600", "--dca-local-size", "8"],
            "--dca-chunk-size': is required",
        ),
        (
            ["niah", "--model", "{model}", "--lengths", "600", "--out", "{tmp}/a.png", "--results", "{tmp}/a.json"],
            "the same file as --out's grid",
        ),
        (
            [
                "ppl",
                "--model",
                "{model}",
                "--file",
                "{tmp}/t.txt",
                "--json",
                "{tmp}/r.jsonl",
                "--results",
                "{tmp}/r.jsonl",
            ],
            "the same file as --json",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, argv, message):
    (tmp_path / "t.txt").write_text("hello world " * 10)
    argv = [a.format(tmp=tmp_path, model=tiny[0]) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "a.json").exists()
    assert not (tmp_path / "r.jsonl").exists()


# --- the real model -------------------------------------------------------------------------

MULTILINGUAL = (
    "The river flows quietly through the old town, past the market square and under the stone bridge. "
    "In the morning, fishermen prepare their boats while the bakers open their shops. "
    "河流静静地穿过古老的小镇，经过集市广场，从石桥下流过。早晨，渔民们准备他们的船，面包师打开他们的店铺。"
    "Der Fluss fließt ruhig durch die Altstadt, vorbei am Marktplatz und unter der Steinbrücke hindurch. "
    "Le fleuve traverse tranquillement la vieille ville, passe devant la place du marché et sous le pont de pierre. "
    "El río fluye tranquilamente por el casco antiguo, junto a la plaza del mercado y bajo el puente de piedra. "
    "川は旧市街を静かに流れ、市場の広場を過ぎて石橋の下をくぐります。"
)


@pytest.mark.real_model
def test_real_model_passkey_with_dca_at_2500_tokens(real_model_path):
    model, tok = load(
        real_model_path,
        dtype=mx.float32,
        dca={"chunk_size": 1024, "local_size": 256, "original_max_position_embeddings": 0},
    )
    results = ResultsFile(None, {})
    for trials in (1, 2, 3):  # resumes each time; a third trial only when the first two disagree
        summary = run_passkey(model, tok, length=2500, trials=trials, seed=0, results=results)
        found = sum(t["ok"] for t in summary["trials"])
        if found >= 2 or trials - found >= 2:
            break
    assert all(2400 < t["tokens"] <= 2500 for t in summary["trials"])
    assert found >= 2, summary["trials"]


@pytest.mark.real_model
def test_real_model_perplexity_beats_shuffled_tokens(real_model_path):
    model, tok = load(real_model_path, dtype=mx.float32)
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    shuffled = list(ids)
    random.Random(0).shuffle(shuffled)
    real = perplexity(model, ids, context=256, stride=128)
    control = perplexity(model, shuffled, context=256, stride=128)
    assert np.isfinite(real["perplexity"]) and real["perplexity"] > 1.0
    assert real["scored_tokens"] == len(ids) - 1
    assert real["perplexity"] < control["perplexity"] / 4, (real["perplexity"], control["perplexity"])
