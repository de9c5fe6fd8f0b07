"""Our models inside lm-evaluation-harness: the model type `qwen2-mlx` (alias `qwen2_mlx`).

Importing this module registers it, so `lm_eval.simple_evaluate(model="qwen2-mlx",
model_args="pretrained=PATH")` runs any lm-eval task on a folder loaded by `qwen2_mlx.load`, with
the long-context switches as model arguments (`dca_chunk_size`, `dca_local_size`,
`dca_original_max_position_embeddings`, `yarn_factor`, `yarn_original_max_position_embeddings`).
TemplateLM does the context/continuation tokenization the way lm-eval's HF model does; here are
the three requests, batched: log-likelihoods (right-padded rows, one forward, the head applied only
where a continuation token is predicted), rolling log-likelihoods (lm-eval's disjoint windows
over the model's context length, scored by the same batches) and generate-until (our
`batch_generate`, or `stream_generate` one request at a time under Dual Chunk Attention).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import mlx.core as mx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from qwen2_mlx.arguments import long_context_overrides, mlx_dtype
from qwen2_mlx.generation.batch import batch_generate
from qwen2_mlx.generation.generate import context_limit, stream_generate
from qwen2_mlx.generation.prompt_cache import make_prompt_cache
from qwen2_mlx.loading.loader import load

from .ppl import _head

DEFAULT_GEN_TOKENS = 256  # lm-eval's HF model's default max_gen_toks


@register_model("qwen2-mlx", "qwen2_mlx")
class Qwen2MLXLM(TemplateLM):
    """An lm-eval model over a qwen2_mlx folder (`pretrained=`), or over a loaded (model, tokenizer)."""

    def __init__(
        self,
        pretrained: Optional[str] = None,
        *,
        model=None,
        tokenizer=None,
        dtype: str = "auto",
        batch_size: int | str = 8,
        max_length: Optional[int] = None,
        max_gen_toks: int = DEFAULT_GEN_TOKENS,
        prefill_step_size: int = 512,
        dca_chunk_size: Optional[int] = None,
        dca_local_size: Optional[int] = None,
        dca_original_max_position_embeddings: int = 0,
        yarn_factor: Optional[float] = None,
        yarn_original_max_position_embeddings: Optional[int] = None,
        **_ignored,  # lm-eval passes device and max_batch_size to every model type
    ):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("qwen2-mlx needs pretrained=PATH (a model folder)")
            switches = argparse.Namespace(
                dca_chunk_size=dca_chunk_size and int(dca_chunk_size),
                dca_local_size=dca_local_size and int(dca_local_size),
                dca_original_max_position_embeddings=int(dca_original_max_position_embeddings),
                yarn_factor=yarn_factor and float(yarn_factor),
                yarn_original_max_position_embeddings=yarn_original_max_position_embeddings
                and int(yarn_original_max_position_embeddings),
            )
            model, tokenizer = load(Path(pretrained), dtype=mlx_dtype(dtype), **long_context_overrides(switches))
        self.model, self.tokenizer = model, tokenizer
        self.name = str(pretrained or "qwen2-mlx")
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else context_limit(model)
        self.max_gen_toks = int(max_gen_toks)
        self.prefill_step_size = int(prefill_step_size)
        self.dca = getattr(model.args, "dual_chunk_attention_config", None) is not None

    # --- what TemplateLM needs ------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else min(self.tokenizer.eos_token_ids)

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def chat_template(self, chat_template=False) -> Optional[str]:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # --- scoring --------------------------------------------------------------------------

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Each row is (tokens, start): the summed log-probability of tokens[start:] given what precedes
        them, and whether greedy decoding would have produced exactly them. One batched forward."""
        width = max(len(t) for t, _ in rows)
        x = mx.array([t[:-1] + [0] * (width - len(t)) for t, _ in rows], dtype=mx.uint32)
        cache = make_prompt_cache(self.model)
        for c in cache:  # DCA caches set their temperature from the whole sequence
            if hasattr(c, "length_hint"):
                c.length_hint = width
        parts = []
        for s in range(0, width - 1, self.prefill_step_size):
            h = self.model.model(x[:, s : s + self.prefill_step_size], cache=cache)
            mx.eval(h, [c.state for c in cache])
            parts.append(h)
        hidden = mx.concatenate(parts, axis=1)
        out = []
        for k, (tokens, start) in enumerate(rows):
            logits = _head(self.model, hidden[k, start - 1 : len(tokens) - 1]).astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            target = mx.array(tokens[start:], dtype=mx.int32)
            score = mx.take_along_axis(logprobs, target[:, None], axis=-1).sum()
            greedy = mx.all(mx.argmax(logits, axis=-1) == target)
            out.append((score.item(), bool(greedy.item())))
        return out

    def _score_all(self, rows: list[tuple[list[int], int]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """Score rows in batches of similar length (longest first), answers in the order given."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list = [None] * len(rows)
        for a in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="qwen2-mlx scoring"):
            batch = order[a : a + self.batch_size]
            for i, r in zip(batch, self._score_rows([rows[i] for i in batch])):
                results[i] = r
            mx.clear_cache()
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            # Keep at most max_length + 1 tokens: drop context from the left, as lm-eval's HF model does.
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows.append((whole, len(whole) - len(continuation)))
        return self._score_all(rows, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []
        for i, req in enumerate(requests):
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, windows):
                rows.append((context + continuation, len(context)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (score, _) in zip(owner, self._score_all(rows, disable_tqdm)):
            totals[i] += score
        return totals

    # --- generation -----------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, as the task asks) until a stop string, the end of turn or max_gen_toks."""
        groups: dict = {}
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            groups.setdefault((tuple(until), temperature), []).append((i, context, limit))
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="qwen2-mlx generating")
        for (until, temperature), items in groups.items():
            prompts = [self.tok_encode(c)[-max(1, self.max_length - n) :] for _, c, n in items]
            limits = [n for _, _, n in items]
            for (i, _, _), text in zip(items, self._generate(prompts, limits, list(until), temperature)):
                out[i] = text
                bar.update(1)
        bar.close()
        return out

    def _generate(self, prompts, limits, until, temperature) -> list[str]:
        if not self.dca:
            replies = batch_generate(
                self.model,
                self.tokenizer,
                prompts,
                max_tokens=limits,
                batch_size=self.batch_size,
                temperature=temperature,
                stop=until,
                prefill_step_size=self.prefill_step_size,
            )
            return [str(t) for t in replies.texts]
        texts = []
        for prompt, limit in zip(prompts, limits):  # batch_generate does not run DCA models
            parts = stream_generate(
                self.model,
                self.tokenizer,
                prompt,
                max_tokens=limit,
                temperature=temperature,
                stop=until,
                prefill_step_size=self.prefill_step_size,
            )
            texts.append("".join(r.text for r in parts))
        return texts
