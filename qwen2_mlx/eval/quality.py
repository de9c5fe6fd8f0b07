"""How close a model (A) is to a reference (B) on one fixed text: perplexity, next-token agreement, KL, size.

Both models read the same tokens in one causal pass each (through the KV cache in prefill steps, as
generation does). At every position we compare their next-token distributions: agreement is the
share of positions where their most likely tokens (argmax) are equal, KL is the mean over positions
of KL(B || A) = sum_v p_B(v) (log p_B(v) - log p_A(v)) in nats, and each model's perplexity is that of
the text itself. The output head runs on a few positions at a time, so the full logits of the text
(tokens x vocabulary) are never held in memory; the final hidden states are, and are small.

A quantized model computes the function of its dequantized weights: on a CPU backend, where MLX's
quantized matmuls are slow, `dequantize_quantized` turns A's quantized layers back into float layers
holding exactly those values (tests/test_eval_quality.py checks that both give the same top-1 and
logits within 2e-3 on a short text).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen2_mlx.generation.prompt_cache import make_prompt_cache

from .ppl import _head

TEXT = Path(__file__).with_name("data") / "quality.txt"  # English prose, Chinese prose, Python code


def final_hidden(model, tokens: Sequence[int], prefill_step_size: int = 512) -> mx.array:
    """The last layer's normed hidden states, (len(tokens), hidden_size), in one causal pass."""
    x = mx.array(list(tokens), dtype=mx.uint32)[None]
    cache = make_prompt_cache(model)
    for c in cache:  # DCA caches set their temperature from the whole sequence, as generation does
        if hasattr(c, "length_hint"):
            c.length_hint = x.shape[1]
    parts = []
    for s in range(0, x.shape[1], prefill_step_size):
        h = model.model(x[:, s : s + prefill_step_size], cache=cache)[0]
        mx.eval(h, [c.state for c in cache])
        parts.append(h)
    return mx.concatenate(parts, axis=0)


def _logprobs(model, h: mx.array) -> mx.array:
    logits = _head(model, h).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def compare(model_a, hidden_a: mx.array, model_b, hidden_b: mx.array, tokens: Sequence[int], chunk: int = 128) -> dict:
    """Perplexities of A and B on `tokens`, argmax agreement and mean KL(B || A) over the n - 1 predictions."""
    n = len(tokens)
    if n < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to compare")
    targets = mx.array(list(tokens[1:]), dtype=mx.int32)
    nll_a = nll_b = kl_sum = 0.0
    kl_max = 0.0
    same = 0
    for s in range(0, n - 1, chunk):
        e = min(s + chunk, n - 1)
        lp_a, lp_b = _logprobs(model_a, hidden_a[s:e]), _logprobs(model_b, hidden_b[s:e])
        t = targets[s:e, None]
        kl = (mx.exp(lp_b) * (lp_b - lp_a)).sum(axis=-1)
        stats = (
            -mx.take_along_axis(lp_a, t, axis=-1).sum(),
            -mx.take_along_axis(lp_b, t, axis=-1).sum(),
            kl.sum(),
            kl.max(),
            (mx.argmax(lp_a, axis=-1) == mx.argmax(lp_b, axis=-1)).sum(),
        )
        mx.eval(stats)
        nll_a += stats[0].item()
        nll_b += stats[1].item()
        kl_sum += stats[2].item()
        kl_max = max(kl_max, stats[3].item())
        same += int(stats[4].item())
    scored = n - 1
    return {
        "tokens": n,
        "scored": scored,
        "perplexity": math.exp(nll_a / scored),
        "reference_perplexity": math.exp(nll_b / scored),
        "agreement": same / scored,
        "kl": max(0.0, kl_sum / scored),  # rounding can make an exact copy's KL -1e-9
        "kl_max": kl_max,
    }


def quantized_layers(model) -> list[str]:
    return [name for name, m in model.named_modules() if hasattr(m, "scales") and hasattr(m, "bits")]


def dequantize_quantized(model) -> int:
    """Replace the quantized layers by float layers holding their dequantized weights; returns how many."""
    from mlx_lm.utils import dequantize_model

    count = len(quantized_layers(model))
    if count:
        dequantize_model(model)
        left = quantized_layers(model)
        if left:  # a layer type mlx-lm cannot dequantize: its results would mix both paths unannounced
            raise ValueError(f"cannot dequantize {len(left)} layers (e.g. {left[0]}); use --quantized-kernels")
    return count


def parameter_count(model: nn.Module) -> int:
    """Weights the model holds, counting each quantized weight by the float values it packs."""
    modules = dict(model.named_modules())
    total = 0
    for name, v in tree_flatten(model.parameters()):
        layer, _, kind = name.rpartition(".")
        m = modules.get(layer)
        bits = getattr(m, "bits", None) if m is not None and "scales" in m else None
        if bits and kind in ("scales", "biases"):
            continue
        total += v.size * 32 // bits if bits and kind == "weight" else v.size
    return total


def memory_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as loaded (packed weights, scales and biases for quantized layers;
    float tensors in the compute dtype they were cast to)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def disk_bytes(path: Path) -> int:
    """Bytes of the folder's weight files: what the weights take in memory at the checkpoint's own dtypes."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def tokenizer_mismatch(tok_a, tok_b, text: str, vocab_a: int, vocab_b: int) -> str | None:
    """Why A and B cannot be compared token by token, or None when they can."""
    if vocab_a != vocab_b:
        return f"vocabulary sizes differ ({vocab_a} vs {vocab_b})"
    ids_a, ids_b = tok_a.encode(text, add_special_tokens=False), tok_b.encode(text, add_special_tokens=False)
    if ids_a != ids_b:
        first = next((i for i, (p, q) in enumerate(zip(ids_a, ids_b)) if p != q), min(len(ids_a), len(ids_b)))
        return f"their tokenizers split the text differently (first difference at token {first})"
    return None


def format_report(summary: dict) -> str:
    from qwen2_mlx.convert.writer import format_size

    size = summary["size"]
    lines = [
        f"model: {summary['model']}",
        f"reference: {summary['reference']}",
        f"text: {summary['text']} ({summary['tokens']} tokens, {summary['scored']} predictions)",
        f"perplexity: {summary['perplexity']:.4f} (reference {summary['reference_perplexity']:.4f})",
        f"next-token agreement: {summary['agreement']:.2%}",
        f"KL(reference || model): {summary['kl']:.5f} nats/token (max {summary['kl_max']:.4f})",
        f"size: {format_size(size['disk_bytes'])} on disk ({size['bits_per_weight']:.2f} bits per weight), "
        f"{format_size(size['memory_bytes'])} in memory as loaded here (--dtype {summary['dtype']})",
    ]
    if summary.get("dequantized_layers"):
        lines.append(
            f"computed with {summary['dequantized_layers']} quantized layers dequantized to float32 "
            "(the same weights; --quantized-kernels runs MLX's quantized matmuls instead)"
        )
    if "humaneval" in summary:
        h = summary["humaneval"]
        lines.append(
            f"HumanEval pass@1: {h['pass@1']:.1f} ± {h['stderr']:.1f} ({h['passed']}/{h['problems']} problems)"
        )
    return "\n".join(lines)
