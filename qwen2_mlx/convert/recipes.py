"""Mixed-precision quantization recipes: mlx-lm's, by their names, and two of ours.

mlx-lm's recipes (`mixed_2_6` ... `mixed_4_6`, llama.cpp's Q4_K_M choices) give `lm_head`, and
`v_proj`/`down_proj` in the first and last eighth of the layers and every third layer between, the
high bits, everything else the low bits. Ours reuse that layer choice with other bit widths and set
the head's and the token embeddings' bits apart: with an untied head they are 43 % of a 0.5B
model's weights. Measured on the real model (docs/converting.md, "Quantization by measured quality"): the head
and the sensitive layers gain from 8 bits, the embeddings (a lookup) lose little at 4. In a model with
tied embeddings the one matrix is also the head, and gets the head's bits.
This module imports nothing heavy at the top, so `--help` and name checks stay instant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

MLX_LM_RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")  # mlx_lm.convert.QUANT_RECIPES
# name -> (mlx-lm recipe whose layer choice is reused, its bit widths -> ours, bits of lm_head, of embed_tokens)
OWN_RECIPES = {
    "mixed_4_6_e8": ("mixed_4_6", {4: 4, 6: 6}, 8, 8),
    "mixed_6_8": ("mixed_4_6", {4: 6, 6: 8}, 8, 8),
    "mixed_6_8_e4": ("mixed_4_6", {4: 6, 6: 8}, 8, 4),
}
RECIPES = MLX_LM_RECIPES + tuple(OWN_RECIPES)

Predicate = Callable[[str, object], Union[bool, dict]]


def describe(name: str) -> str:
    """One line saying what a recipe does (for --help and docs/converting.md)."""
    if name in MLX_LM_RECIPES:
        low, high = name.split("_")[1:]
        return f"mlx-lm's: {high}-bit lm_head and sensitive v_proj/down_proj, {low}-bit elsewhere"
    base, remap, head, embed = OWN_RECIPES[name]
    return (
        f"{head}-bit head, {embed}-bit embeddings, {remap[6]}-bit sensitive layers ({base}'s), {remap[4]}-bit elsewhere"
    )


def check_name(name: str) -> None:
    if name not in RECIPES:
        raise ValueError(f"unknown --quant-predicate {name!r} (choose from {', '.join(RECIPES)})")


def recipe_predicate(name: str, model, group_size: int) -> Predicate:
    """mlx-lm's `quant_predicate` signature: (path, module) -> True or {"group_size", "bits", "mode"}."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    check_name(name)
    if name in MLX_LM_RECIPES:
        return mixed_quant_predicate_builder(name, model, group_size)
    base_name, remap, head_bits, embed_bits = OWN_RECIPES[name]
    base = mixed_quant_predicate_builder(base_name, model, group_size)
    tied = "lm_head" not in dict(model.named_modules())  # the embedding is the head too: it gets the head's bits
    edges = {"lm_head": head_bits, "embed_tokens": head_bits if tied else embed_bits}

    def predicate(path: str, module) -> Union[bool, dict]:
        leaf = path.rsplit(".", 1)[-1]
        if leaf in edges:
            return {"group_size": group_size, "bits": edges[leaf], "mode": "affine"}
        choice = base(path, module)
        if isinstance(choice, dict):
            choice = {**choice, "bits": remap[choice["bits"]]}
        return choice

    return predicate
