"""Our models run in mlx-lm's tools, and we load the folders mlx-lm writes."""

import mlx.core as mx
import numpy as np
import pytest
from tiny import DENSE, MOE, make_checkpoint

from qwen2_mlx import load


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("dense"), DENSE, seed=5)[0]


def test_mlx_lm_stream_generate_drives_our_model(dense):
    from mlx_lm.generate import stream_generate as mlx_stream_generate

    from qwen2_mlx import generate

    model, tok = load(dense)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    theirs = list(mlx_stream_generate(model, tok, prompt, max_tokens=12))
    assert theirs[-1].finish_reason in ("length", "stop")
    ours = generate(model, tok, prompt, max_tokens=12)
    assert "".join(r.text for r in theirs) == ours
    assert theirs[-1].prompt_tokens == len(prompt)


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "4bit"])
@pytest.mark.parametrize("base", [DENSE, MOE], ids=["dense", "moe"])
def test_load_folder_written_by_mlx_lm_convert(tmp_path, base, quantize):
    from mlx_lm import load as mlx_load
    from mlx_lm.convert import convert as mlx_convert

    src, _ = make_checkpoint(tmp_path / "hf", base, seed=6)
    out = tmp_path / "mlx"
    mlx_convert(str(src), mlx_path=str(out), quantize=quantize, q_group_size=32, dtype="float32")
    theirs, _ = mlx_load(str(out))
    ours, tok = load(out)
    ids = mx.array(np.random.RandomState(0).randint(0, 500, (1, 20)))
    a, b = np.array(ours(ids)), np.array(theirs(ids))
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    if quantize:
        assert ours.args.quantization["bits"] == 4
        assert hasattr(ours.model.layers[0].self_attn.q_proj, "scales")
