"""The lm-evaluation-harness adapter: local JSON tasks (multiple choice, generate-until, rolling
log-likelihood) scored through lm-eval on a tiny checkpoint give what a plain transformers
computation on the same checkpoint gives, per document and in the task's metric."""

from __future__ import annotations

import json
import os

import pytest
from tiny import DENSE, make_checkpoint

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local JSON files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MC_DOCS = [
    {"question": "The quick brown fox", "choices": [" jumps", " is lazy", " dog."], "answer": 0},
    {"question": "Hello, how are", "choices": [" you?", " I am fine", " world"], "answer": 1},
    {"question": "def main():\n   ", "choices": [" return 42", " pass", " print(1)"], "answer": 0},
    {"question": "你好，", "choices": ["世界！", "今天天气很好。", " emoji"], "answer": 2},
    {"question": "Thank", "choices": [" you.", " the fox", " dog over the lazy"], "answer": 1},
]
GEN_PROMPTS = ["The quick brown", "Hello, how", "def main():", "I am fine,"]
ROLLING_DOCS = ["The quick brown fox jumps over the lazy dog.", "Hello, how are you? I am fine, thank you."]
GEN_TOKENS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 384 ids, all of them tokens (tiny.py's 512 leaves ids the tokenizer cannot decode, which
    # streaming and whole-text decoding render differently)
    path, torch_model = make_checkpoint(tmp_path_factory.mktemp("lmeval") / "tiny", DENSE, vocab_size=384)
    assert RefTokenizer(path / "tokenizer.json").tok.get_vocab_size() == 384
    return path, torch_model, RefTokenizer(path / "tokenizer.json")


class RefTokenizer:
    """The checkpoint's tokenizer.json through the tokenizers library, as the model folder defines it
    (transformers 5's AutoTokenizer splits this tiny byte-level BPE differently)."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.tok.token_to_id(token)


# --- the reference: transformers, one sequence at a time ------------------------------------


def _logprobs(torch_model, ids):
    with torch.no_grad():
        logits = torch_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def ref_loglikelihood(torch_model, tok, context: str, continuation: str) -> tuple[float, bool]:
    stripped = context.rstrip()  # lm-eval's rule: the context's trailing whitespace starts the continuation
    context, continuation = stripped, context[len(stripped) :] + continuation
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    cont = whole[len(ctx) :]
    lp = _logprobs(torch_model, whole)[len(ctx) - 1 : len(whole) - 1]
    target = torch.tensor(cont)
    return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def ref_generate(torch_model, tok, prompt: str, until: list[str]) -> str:
    ids = tok.encode(prompt, add_special_tokens=False)
    new = []
    for _ in range(GEN_TOKENS):
        nxt = int(_logprobs(torch_model, ids + new)[-1].argmax())
        if nxt == tok.convert_tokens_to_ids("<|im_end|>"):
            break
        new.append(nxt)
        text = tok.decode(new)
        if any(u in text for u in until):
            break
    text = tok.decode(new)
    cut = [text.find(u) for u in until if u in text]
    return text[: min(cut)] if cut else text


def ref_rolling(torch_model, tok, text: str) -> float:
    ids = [tok.convert_tokens_to_ids("<|im_end|>")] + tok.encode(text, add_special_tokens=False)
    lp = _logprobs(torch_model, ids)[:-1]
    return float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum())


# --- the tasks ------------------------------------------------------------------------------


def _write_task(folder, name: str, docs: list[dict], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n{body}",
        encoding="utf-8",
    )


@pytest.fixture(scope="module")
def tasks(tiny, tmp_path_factory):
    """Three local tasks; half the generation targets are the reference's own outputs, so its
    exact-match score is 0.5 only if our outputs equal transformers' on every document."""
    _, torch_model, tok = tiny
    folder = tmp_path_factory.mktemp("tasks")
    _write_task(
        folder,
        "tiny_mc",
        MC_DOCS,
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n",
    )
    outputs = [ref_generate(torch_model, tok, p, ["\n", "."]) for p in GEN_PROMPTS]
    targets = [o if k % 2 == 0 else "no" for k, o in enumerate(outputs)]
    gen_docs = [{"prompt": p, "target": t} for p, t in zip(GEN_PROMPTS, targets)]
    _write_task(
        folder,
        "tiny_gen",
        gen_docs,
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        f'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: {GEN_TOKENS}\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
    )
    _write_task(
        folder,
        "tiny_rolling",
        [{"text": t} for t in ROLLING_DOCS],
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n",
    )
    return folder, outputs


@pytest.fixture(scope="module")
def evaluated(tiny, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from qwen2_mlx.eval.lm_eval_adapter import Qwen2MLXLM

    lm = Qwen2MLXLM(str(tiny[0]), dtype="float32", batch_size=3)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=["tiny_mc", "tiny_gen", "tiny_rolling"],
        task_manager=TaskManager(include_path=str(tasks[0])),
        log_samples=True,
    )


def _by_doc(out, task):
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def test_multiple_choice_matches_transformers(tiny, evaluated):
    _, torch_model, tok = tiny
    correct = 0
    for sample, doc in zip(_by_doc(evaluated, "tiny_mc"), MC_DOCS):
        ours = [r[0] for r in sample["resps"]]
        ref = [ref_loglikelihood(torch_model, tok, doc["question"], c) for c in doc["choices"]]
        for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, ref):
            assert ll == pytest.approx(ref_ll, rel=1e-4, abs=1e-3) and greedy == ref_greedy
        correct += max(range(len(ref)), key=lambda i: ref[i][0]) == doc["answer"]
    assert evaluated["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))


def test_generate_until_matches_transformers(tasks, evaluated):
    ours = [s["resps"][0][0] for s in _by_doc(evaluated, "tiny_gen")]
    assert ours == tasks[1]
    assert any(tasks[1])  # something was generated before the stop strings
    assert evaluated["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(0.5)


def test_rolling_loglikelihood_matches_transformers(tiny, evaluated):
    _, torch_model, tok = tiny
    ours = [s["resps"][0][0] for s in _by_doc(evaluated, "tiny_rolling")]
    ref = [ref_rolling(torch_model, tok, t) for t in ROLLING_DOCS]
    assert ours == pytest.approx(ref, rel=1e-4, abs=1e-3)


def test_rolling_windows_shorter_than_the_text_match_transformers_window_by_window(tiny):
    """With max_length below the text's length, each of lm-eval's disjoint windows is scored as
    transformers scores it alone, and the windows together predict every token once."""
    from lm_eval import utils as lm_utils
    from lm_eval.api.instance import Instance

    from qwen2_mlx.eval.lm_eval_adapter import Qwen2MLXLM

    _, torch_model, tok = tiny
    text = " ".join(ROLLING_DOCS * 3)
    ids = tok.encode(text, add_special_tokens=False)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    windows = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(ids, eot, 16, 1)))
    assert len(windows) > 3 and sum(len(cont) for _, cont in windows) == len(ids)
    ref = 0.0
    for ctx, cont in windows:
        lp = _logprobs(torch_model, ctx + cont)[len(ctx) - 1 : -1]
        ref += float(lp.gather(1, torch.tensor(cont)[:, None]).sum())
    short = Qwen2MLXLM(str(tiny[0]), dtype="float32", batch_size=2, max_length=16)
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    assert short.loglikelihood_rolling([req], disable_tqdm=True)[0] == pytest.approx(ref, rel=1e-4, abs=1e-3)


def test_registered_name_and_command_line(tiny, tasks, tmp_path, capsys):
    from lm_eval.api.registry import get_model

    from qwen2_mlx.eval.__main__ import main
    from qwen2_mlx.eval.lm_eval_adapter import Qwen2MLXLM

    assert get_model("qwen2-mlx") is Qwen2MLXLM
    out = tmp_path / "mc.json"
    args = ["lm-eval", "--model", str(tiny[0]), "--tasks", "tiny_mc", "--include-path", str(tasks[0])]
    assert main([*args, "--batch-size", "2", "--json", str(out)]) == 0
    assert "tiny_mc" in capsys.readouterr().out
    assert "acc,none" in json.loads(out.read_text())["results"]["tiny_mc"]
    assert main(["lm-eval", "--model", str(tiny[0]), "--tasks", "nope", "--include-path", str(tasks[0])]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_long_context_switches_reach_the_model_and_generation_runs_one_by_one_under_dca(tiny, tasks):
    """Under DCA (batch_generate does not run it) replies come from stream_generate; below the chunk size
    DCA computes plain attention, so they equal transformers' replies."""
    from lm_eval.api.instance import Instance

    from qwen2_mlx.eval.lm_eval_adapter import Qwen2MLXLM

    lm = Qwen2MLXLM(str(tiny[0]), dtype="float32", batch_size=2, dca_chunk_size=256, dca_local_size=32)
    assert lm.dca and lm.max_length > 4096  # DCA lifts the trained window
    kwargs = {"until": ["\n", "."], "max_gen_toks": GEN_TOKENS}
    reqs = [Instance("generate_until", {}, (p, kwargs), k) for k, p in enumerate(GEN_PROMPTS)]
    assert lm.generate_until(reqs, disable_tqdm=True) == tasks[1]
