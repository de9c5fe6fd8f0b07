"""Tokenizer: `tokenizers` for BPE, Jinja for the chat template, mlx-lm's streaming detokenizer.

`Tokenizer` offers the subset of transformers' tokenizer API that mlx-lm and our generation code
use (encode/decode, eos ids, `apply_chat_template`, `convert_ids_to_tokens`, `get_vocab`), and
`load_tokenizer` wraps it in mlx-lm's `TokenizerWrapper` so mlx-lm's tools accept it unchanged.
The chat template is rendered the way transformers renders it (sandboxed Jinja, trim_blocks,
lstrip_blocks, `tojson`, `raise_exception`), so the ids match transformers' exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from tokenizers import Tokenizer as HFTokenizer


class TokenizerError(ValueError):
    pass


@lru_cache(maxsize=16)
def _compile_template(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"chat template error: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson keeps non-ASCII text as is (the Jinja default would escape it).
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _content_str(token: Any) -> Optional[str]:
    if token is None:
        return None
    if isinstance(token, dict):
        return token.get("content")
    return str(token)


class Tokenizer:
    """A BPE tokenizer read from `tokenizer.json`, with the chat template of the model folder."""

    def __init__(self, tokenizer: HFTokenizer, config: Optional[dict] = None, chat_template: Optional[str] = None):
        self._tok = tokenizer
        config = config or {}
        self.init_kwargs = config
        self.chat_template = chat_template
        self.bos_token = _content_str(config.get("bos_token"))
        self.eos_token = _content_str(config.get("eos_token"))
        self.pad_token = _content_str(config.get("pad_token"))
        self.unk_token = _content_str(config.get("unk_token"))
        self.eos_token_id = self.convert_tokens_to_ids(self.eos_token) if self.eos_token else None
        self.bos_token_id = self.convert_tokens_to_ids(self.bos_token) if self.bos_token else None
        self.pad_token_id = self.convert_tokens_to_ids(self.pad_token) if self.pad_token else None
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.added_special_ids = (
            {t.id if hasattr(t, "id") else i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
            if hasattr(self._tok, "get_added_tokens_decoder")
            else set()
        )
        self.all_special_ids = sorted(self.added_special_ids)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise TokenizerError(f"{tj}: file not found (a model folder needs tokenizer.json)")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise TokenizerError(f"{tj}: cannot be read ({e})") from None
        config: dict = {}
        tc = path / "tokenizer_config.json"
        if tc.exists():
            try:
                config = json.loads(tc.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{tc}: not valid JSON ({e})") from None
        template = config.get("chat_template")
        jinja = path / "chat_template.jinja"
        if jinja.exists():
            template = jinja.read_text(encoding="utf-8")
        elif (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, config, template)

    # --- transformers-like API --------------------------------------------------------------
    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict:
        return self._tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, **_) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text, add_special_tokens: bool = True, **_):
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, **_) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, seqs, skip_special_tokens: bool = False, **_) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def apply_chat_template(
        self,
        conversation: list[dict],
        tools: Optional[list] = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: Optional[str] = None,
        continue_final_message: bool = False,
        **kwargs,
    ):
        template = chat_template or self.chat_template
        if not template:
            raise TokenizerError("this model has no chat template (tokenizer_config.json or chat_template.jinja)")
        kwargs.pop("return_dict", None)
        text = _compile_template(template).render(
            messages=conversation,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            unk_token=self.unk_token or "",
            **kwargs,
        )
        if continue_final_message and conversation:
            # Cut after the final message's content, as transformers does, so generation continues it.
            last = conversation[-1].get("content")
            if isinstance(last, str) and last.strip() in text:
                text = text[: text.rindex(last.strip()) + len(last.strip())]
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(path: str | Path, eos_token_ids: Optional[Iterable[int]] = None):
    """Load our tokenizer and wrap it in mlx-lm's TokenizerWrapper (streaming BPE detokenizer)."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

    tok = Tokenizer.from_folder(path)
    eos = set(eos_token_ids or [])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and tok.chat_template:
        eos.add(im_end)  # Qwen2 chat models end a turn with <|im_end|>
    return TokenizerWrapper(tok, detokenizer_class=BPEStreamingDetokenizer, eos_token_ids=eos)
