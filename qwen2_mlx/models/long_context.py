"""Which long-context method a model runs with, and how far its context reaches (docs/long-context.md).

A model whose config names no method gets Dual Chunk Attention by default: it equals plain attention
up to `chunk_size + 1` tokens, so nothing changes inside the trained window, and reaches past it.
`default_dca` is the one place that geometry is chosen.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .config import ConfigError, DCAConfig, ModelArgs, _parse_rope_scaling, parse_dca

LONG_CONTEXT_MODES = ("auto", "off", "dca", "yarn")
CONTEXT_FACTOR = 4  # the default context limit under DCA: this many trained windows (131,072 for 32K models)
YARN_FACTOR = 4.0  # `long_context="yarn"` on a config without a YaRN block


def default_dca(max_position_embeddings: int) -> DCAConfig:
    """The DCA geometry a model gets by default: chunk = its trained window, local window = chunk / 8."""
    chunk = max(2, int(max_position_embeddings))
    return DCAConfig(chunk_size=chunk, local_size=max(1, chunk // 8), original_max_position_embeddings=0)


def names_long_context(args: ModelArgs) -> bool:
    """Whether the config already chose a method (DCA, or a RoPE scaling such as YaRN or linear)."""
    return args.dual_chunk_attention_config is not None or args.rope_type != "default"


def resolve_long_context(
    args: ModelArgs,
    mode: Optional[str] = "auto",
    dca: Optional[dict] = None,
    rope_scaling: Optional[dict] = None,
    source: str = "load()",
) -> ModelArgs:
    """The args with the long-context method applied: explicit `dca=`/`rope_scaling=` win, then `mode`.

    `auto` (None too) keeps what the config names and adds `default_dca` when it names nothing; `off` is
    plain attention at the trained window; `dca` and `yarn` choose one (the config's settings if it has them).
    """
    mode = mode or "auto"
    if mode not in LONG_CONTEXT_MODES:
        raise ConfigError(source, "long_context", f"must be one of {', '.join(LONG_CONTEXT_MODES)}, got {mode!r}")
    if dca is not None:
        if mode in ("off", "yarn"):
            raise ConfigError(source, "dca", f"cannot be combined with long_context={mode!r}")
        args = replace(args, dual_chunk_attention_config=parse_dca(dca, f"{source} dca"))
    if rope_scaling is not None:
        if mode in ("off", "dca"):
            raise ConfigError(source, "rope_scaling", f"cannot be combined with long_context={mode!r}")
        args = replace(args, rope_scaling=_parse_rope_scaling(rope_scaling, f"{source} rope_scaling"))
    if mode == "off":
        return replace(args, dual_chunk_attention_config=None, rope_scaling=None)
    if mode == "dca":  # DCA uses plain RoPE frequencies: a config's rope_scaling would only be ignored
        return replace(
            args,
            dual_chunk_attention_config=args.dual_chunk_attention_config or default_dca(args.max_position_embeddings),
            rope_scaling=None,
        )
    if mode == "yarn":
        if args.rope_type != "yarn":
            yarn = {"rope_type": "yarn", "factor": YARN_FACTOR}
            yarn["original_max_position_embeddings"] = args.max_position_embeddings
            args = replace(args, rope_scaling=_parse_rope_scaling(yarn, source))
        return replace(args, dual_chunk_attention_config=None)
    if not names_long_context(args):
        args = replace(args, dual_chunk_attention_config=default_dca(args.max_position_embeddings))
    return args


def default_context_limit(args: ModelArgs) -> int:
    """The longest sequence a model runs to unless told otherwise (`max_context=` changes it).

    DCA: `CONTEXT_FACTOR` trained windows; YaRN: its factor times the window it scales from; else the window.
    """
    if args.dual_chunk_attention_config is not None:
        return CONTEXT_FACTOR * args.max_position_embeddings
    if args.rope_type == "yarn":
        orig = args.rope_scaling.get("original_max_position_embeddings") or args.max_position_embeddings
        return max(args.max_position_embeddings, int(args.rope_scaling["factor"] * orig))
    return args.max_position_embeddings


def describe(args: ModelArgs) -> str:
    """One line for status bars and reports: 'DCA chunk 32768, local 4096', 'YaRN x4.0' or 'plain attention'."""
    dca = args.dual_chunk_attention_config
    if dca is not None:
        return f"DCA chunk {dca.chunk_size}, local {dca.local_size}"
    if args.rope_type == "yarn":
        return f"YaRN x{args.rope_scaling['factor']}"
    return "plain attention"
