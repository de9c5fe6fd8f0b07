"""`kv_bits="auto"`: a float KV cache that turns 8-bit once it would pass a memory budget (kv_budget.py)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from api_support import tiny_model
from mlx_lm.models.cache import QuantizedKVCache

from qwen2_mlx import Chat, generate_step, stream_generate
from qwen2_mlx.generation.kv_budget import auto_start, device_budget, float_bytes_per_token, parse_size, weight_bytes
from qwen2_mlx.generation.kv_quant import KVQuantization
from qwen2_mlx.generation.prompt_cache import make_prompt_cache

PROMPT = "The quick brown fox jumps over the lazy dog. Hello, how are you?"


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny model whose head size (32) takes quantization groups of 32."""
    model, tok, _ = tiny_model(tmp_path_factory, hidden_size=128)
    return model, tok


def budget_for(model, tokens: int) -> int:
    """The budget whose float cache fills exactly at `tokens` tokens."""
    return weight_bytes(model) + tokens * float_bytes_per_token(model)


@pytest.mark.parametrize(
    "text,size", [("4GB", 4 * 10**9), ("512 MB", 512 * 10**6), ("1.5g", 15 * 10**8), ("1000", 1000), (7, 7)]
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "four GB", "-1GB", "0", "4 PB", 0, -5])
def test_bad_sizes_name_the_field(text):
    with pytest.raises(ValueError, match="memory_budget"):
        parse_size(text)


def test_budget_gives_the_start(wide):
    model, _ = wide
    a = model.args
    assert float_bytes_per_token(model) == 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 4
    assert auto_start(model, budget_for(model, 37)) == 37
    assert auto_start(model, budget_for(model, 37) + float_bytes_per_token(model) - 1) == 37
    assert auto_start(model, weight_bytes(model) // 2) == 0  # the weights alone pass it: quantize at once
    assert device_budget() > 2**20
    kv = KVQuantization.make("auto", 32, 0, model, budget_for(model, 37))
    assert (kv.bits, kv.start, kv.auto) == (8, 37, True)
    assert KVQuantization.make("auto", 32, 50, model, budget_for(model, 37)).start == 50  # the later start wins


def test_auto_switches_at_the_budget(wide):
    """The cache stays float below the budget's token count and is 8-bit from it on, as with
    quantized_kv_start at that count; the reply equals the float cache's until the switch."""
    model, tok = wide
    prompt = mx.array(tok.encode(PROMPT, add_special_tokens=False), dtype=mx.uint32)
    switch = prompt.size + 6

    def run(n, **kw):
        cache = make_prompt_cache(model)
        out = [t for t, _ in generate_step(prompt, model, max_tokens=n, prompt_cache=cache, kv_group_size=32, **kw)]
        return out, cache

    budget = budget_for(model, switch)
    for n in (4, 6, 7, 12):  # the cache holds the prompt and n - 1 generated tokens
        out, cache = run(n, kv_bits="auto", memory_budget=budget)
        held = cache[0].offset
        assert held == prompt.size + n - 1
        assert all(hasattr(c, "bits") == (held >= switch) for c in cache), (n, held)
    auto, _ = run(16, kv_bits="auto", memory_budget=budget)
    explicit, _ = run(16, kv_bits=8, quantized_kv_start=switch)
    float_cache, _ = run(16)
    assert auto == explicit
    assert auto[:6] == float_cache[:6]  # the tokens decoded before the switch read a float cache


def test_default_budget_keeps_a_small_chat_in_floats(wide):
    model, tok = wide
    cache = make_prompt_cache(model)
    replies = stream_generate(model, tok, PROMPT, 8, kv_bits="auto", kv_group_size=32, prompt_cache=cache)
    text = "".join(r.text for r in replies)
    assert text and all(not hasattr(c, "bits") for c in cache)


def test_chat_switches_across_turns(wide):
    model, tok = wide
    first = Chat(model, tok, max_tokens=4)
    first.send("First question")
    held = first._cache[0].offset
    chat = Chat(model, tok, kv_bits="auto", kv_group_size=32, memory_budget=budget_for(model, held + 5), max_tokens=4)
    assert chat.send("First question") == first.last_reply
    assert not any(hasattr(c, "bits") for c in chat._cache)
    chat.send("Second question")
    assert all(isinstance(c, QuantizedKVCache) and c.bits == 8 for c in chat._cache)


@pytest.mark.parametrize("budget", ["lots", -3])
def test_bad_budget_is_refused_before_any_work(wide, budget):
    model, tok = wide
    with pytest.raises(ValueError, match="memory_budget"):
        next(stream_generate(model, tok, PROMPT, 4, kv_bits="auto", memory_budget=budget))
    with pytest.raises(ValueError, match="memory_budget"):
        Chat(model, tok, kv_bits="auto", memory_budget=budget)
    with pytest.raises(ValueError, match="kv_bits"):
        Chat(model, tok, kv_bits="sometimes")


# --- the chat app ----------------------------------------------------------------------------------
def test_chat_app_flags():
    from tui.__main__ import build_parser, settings_from

    s = settings_from(build_parser().parse_args(["--kv-bits", "auto", "--memory-budget", "4GB"]))
    assert (s["kv_bits"], s["memory_budget"]) == ("auto", 4 * 10**9)
    for bad in (["--kv-bits", "3"], ["--kv-bits", "auto", "--memory-budget", "lots"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


@pytest.mark.anyio
@pytest.mark.usefixtures("data_home")
@pytest.mark.parametrize("switches", [True, False])
async def test_chat_app_says_when_the_cache_turns_8_bit(tmp_path, tmp_path_factory, switches):
    from tui_helpers import send, wait_until

    from qwen2_mlx.generation.kv_quant import cache_bits
    from qwen2_mlx.loading.loader import load
    from tui.app import ChatApp
    from tui.backend import ModelBackend
    from tui.store import Store

    path = tiny_model(tmp_path_factory, hidden_size=128, num_attention_heads=2)[2]  # head size 64: groups of 64
    model, _ = load(path)
    budget = budget_for(model, 12 if switches else 100_000)  # 12 tokens: inside the first prompt
    settings = {"max_tokens": 6, "temperature": 0.0, "kv_bits": "auto", "memory_budget": budget}
    app = ChatApp(ModelBackend(path, dtype="float32"), Store(tmp_path / "c.sqlite3"), default_settings=settings)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.loaded, timeout=60)
        await send(pilot, "Hello there, a chat that grows past its memory budget.")
        status = str(app.status.query_one("#status-state").render())
        assert ("KV cache now 8-bit: past 12 tokens" in status) == switches, status
        assert cache_bits(app.backend.chat.export_cache()[0]) == (8 if switches else None)
