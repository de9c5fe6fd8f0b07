"""Per-tensor quantization with mlx-lm's rules, so a converted folder loads in mlx_lm.load unchanged.

The decision for each layer is mlx-lm's `quantize_model` one: only modules with `to_quantized`
whose input width divides the group size; a mixed-precision recipe (recipes.py: mlx-lm's
`mixed_quant_predicate_builder`, or ours built on it) picks bits per layer; per-layer choices are
recorded in the config's `quantization` block. On top of that the model's own `quant_predicate`
wins where it returns an override: the MoE router (`mlp.gate`) and `mlp.shared_expert_gate` stay at 8 bits.
Tensors are quantized one at a time, against a model skeleton whose parameters are never evaluated.
"""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .errors import ConvertError

MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}

Params = dict


class QuantPlan:
    """Which layers to quantize and how, for one model skeleton and the user's options."""

    def __init__(
        self,
        model: nn.Module,
        group_size: Optional[int] = None,
        bits: Optional[int] = None,
        mode: str = "affine",
        recipe: Optional[str] = None,
    ):
        if mode not in MODE_DEFAULTS:
            raise ConvertError(f"unknown --q-mode {mode!r} (choose from {', '.join(MODE_DEFAULTS)})")
        dg, db = MODE_DEFAULTS[mode]
        self.group_size, self.bits, self.mode = group_size or dg, bits or db, mode
        self.default = {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}
        if self.group_size <= 0 or self.bits <= 0:
            raise ConvertError("--q-group-size and --q-bits must be positive")
        try:  # let MLX say which combinations it supports, before any file is written
            mx.eval(mx.quantize(mx.zeros((1, self.group_size * 4)), **self.default))
        except (ValueError, RuntimeError) as e:
            raise ConvertError(
                f"--q-bits {self.bits} --q-group-size {self.group_size} --q-mode {mode}: not supported by MLX ({e})"
            ) from None
        self.modules = dict(model.named_modules())
        self.model_predicate = getattr(model, "quant_predicate", None)
        self.recipe = None
        if recipe:
            if mode != "affine":
                raise ConvertError("--quant-predicate recipes only support --q-mode affine")
            from .recipes import recipe_predicate

            try:
                self.recipe = recipe_predicate(recipe, model, self.group_size)
            except ValueError as e:
                raise ConvertError(str(e) if "unknown" in str(e) else f"--quant-predicate {recipe}: {e}") from None
        self.overrides: dict[str, Params] = {}

    def params_for(self, path: str) -> Optional[Params]:
        """Quantization parameters for the layer at `path`, or None to keep it in float."""
        module = self.modules.get(path)
        if module is None or not hasattr(module, "to_quantized"):
            return None
        if module.weight.shape[-1] % self.group_size != 0:
            return None
        choice: Union[bool, dict] = True
        override = self.model_predicate(path, module) if self.model_predicate else True
        if isinstance(override, dict) or override is False:
            choice = override
        elif self.recipe is not None:
            choice = self.recipe(path, module)
        if choice is False:
            return None
        if choice is True:
            return dict(self.default)
        params = {
            "group_size": choice.get("group_size", self.group_size),
            "bits": choice.get("bits", self.bits),
            "mode": choice.get("mode", "affine"),
        }
        if module.weight.shape[-1] % params["group_size"] != 0:
            return None
        if params != self.default:
            self.overrides[path] = params
        return params

    def config_block(self) -> dict:
        """mlx-lm's `quantization` block: defaults, then per-layer overrides."""
        block = dict(self.default)
        block.update(dict(sorted(self.overrides.items())))
        return block


def quantize_tensor(w: mx.array, params: Params) -> dict[str, mx.array]:
    """`{"weight", "scales"[, "biases"]}` for one weight, as nn.QuantizedLinear stores them."""
    out = mx.quantize(w, group_size=params["group_size"], bits=params["bits"], mode=params["mode"])
    names = ("weight", "scales", "biases")
    return dict(zip(names, out))


def quantized_nbytes(shape: tuple, dtype_size: int, params: Params) -> int:
    """Bytes on disk of one quantized weight (packed values + scales + biases)."""
    n = 1
    for d in shape:
        n *= d
    groups = n // params["group_size"]
    if params["mode"] == "affine":
        return n * params["bits"] // 8 + 2 * groups * dtype_size
    return n * params["bits"] // 8 + groups  # fp modes: one 8-bit scale per group


def dequantize_tensor(tensors: dict[str, mx.array], params: Params) -> mx.array:
    return mx.dequantize(
        tensors["weight"],
        tensors["scales"],
        tensors.get("biases"),
        group_size=params["group_size"],
        bits=params["bits"],
        mode=params.get("mode", "affine"),
    )
