"""Which conversion the no-argument `python convert.py` makes, decided from the measured quality table.

On a Mac (Metal) it quantizes: among the rows of `data/quality_table.json` (written by
`python -m qwen2_mlx.eval quality --table ... --json`, shown in docs/converting.md) it takes the variant
with the best next-token agreement with float32 whose size is at most SIZE_BUDGET times the plain
4-bit (group size 64) size; ties go to the lower KL divergence, then the smaller size. When every
candidate row carries a HumanEval pass@1 (`eval quality --table --humaneval N`), the task decides
first: only rows within one standard error of the best pass@1 stay candidates. Sizes are
those of the model being converted when `size_of` is given (the converter passes `planned_bytes`,
computed from its config): the table's model has an untied head, the hub's default model does not. Elsewhere it
keeps float32: MLX's CPU backend runs quantized matmuls ~25x slower than float32 with OpenBLAS.
The decision is a pure function of the backend and the table, so it is tested without a Mac.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ConvertError

TABLE = Path(__file__).with_name("data") / "quality_table.json"
SIZE_BUDGET = 1.5  # the "within ~1.5x the 4-bit size"


@dataclass(frozen=True)
class Choice:
    """Converter options (convert()'s keyword names) and the one line saying why."""

    options: dict
    reason: str


def load_table(path: Path = TABLE) -> list[dict]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"{path}: the quality table cannot be read ({e})") from None
    return rows


def _is_plain_4bit(row: dict) -> bool:
    return row.get("bits") == 4 and row.get("group_size") == 64 and not row.get("recipe")


def _table_size(row: dict) -> int:
    return row["size_bytes"]


def candidates(rows: list[dict], base: dict, budget: float, size_of: Callable[[dict], int]) -> list[dict]:
    """The quantized rows within `budget` times the plain 4-bit row's size."""
    return [r for r in rows if (r.get("bits") or r.get("recipe")) and size_of(r) <= budget * size_of(base)]


def by_task(fits: list[dict]) -> bool:
    """HumanEval decides only when every candidate carries it (a subset would favour the rows measured)."""
    return bool(fits) and all("humaneval" in r for r in fits)


def pick(rows: list[dict], budget: float = SIZE_BUDGET, size_of: Callable[[dict], int] = _table_size) -> tuple:
    """(best row within the budget, the plain 4-bit row it is measured against)."""
    base = next((r for r in rows if _is_plain_4bit(r)), None)
    if base is None:
        raise ConvertError(f"{TABLE.name}: the quality table has no plain 4-bit (group size 64) row")
    fits = candidates(rows, base, budget, size_of)
    if by_task(fits):
        top = max(fits, key=lambda r: r["humaneval"]["pass@1"])["humaneval"]
        fits = [r for r in fits if r["humaneval"]["pass@1"] >= top["pass@1"] - top["stderr"]]
    best = max(fits, key=lambda r: (r["agreement"], -r["kl"], -size_of(r)))
    return best, base


def planned_bytes(config: dict, row: dict) -> int:
    """Bytes of weights a table row's variant takes for the model `config` describes (no weight is read)."""
    from mlx.utils import tree_flatten

    from qwen2_mlx.models.config import ConfigError, ModelArgs
    from qwen2_mlx.models.model import Model

    from .converter import DTYPES
    from .quantize import QuantPlan, quantized_nbytes

    try:
        model = Model(ModelArgs.from_dict(dict(config), "config.json"))  # a skeleton: parameters never evaluated
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    opts = options_for(row)
    size = DTYPES[opts["dtype"] or "bfloat16"].size
    plan = QuantPlan(model, opts["q_group_size"], opts["q_bits"], "affine", opts["quant_predicate"])
    total = 0
    for name, v in tree_flatten(model.parameters()):
        layer, kind = name.rsplit(".", 1)
        params = plan.params_for(layer) if kind == "weight" else None
        total += quantized_nbytes(tuple(v.shape), size, params) if params else v.size * size
    return total


def options_for(row: dict) -> dict:
    """convert()'s keyword arguments that rebuild a table row's variant, dtype (of scales and norms) included."""
    return {
        "quantize": True,
        "q_bits": None if row.get("recipe") else row["bits"],
        "q_group_size": row["group_size"],
        "quant_predicate": row.get("recipe"),
        "dtype": row.get("dtype"),
    }


def default_conversion(
    backend: str, rows: Optional[list[dict]] = None, size_of: Callable[[dict], int] = _table_size
) -> Choice:
    """The default model's conversion for `backend` ("metal", "cpu", ...)."""
    if backend != "metal":
        return Choice(
            {"dtype": "float32"},
            "Keeping float32 (no quantization): on MLX's CPU backend quantized matmul is ~25x slower than "
            "float32 with OpenBLAS (0.35 vs 8.6 tok/s measured).",
        )
    rows = load_table() if rows is None else rows
    best, base = pick(rows, size_of=size_of)
    ratio = size_of(best) / size_of(base)
    reason = (
        f"Quantizing to {best['name']}: the best next-token agreement with float32 in docs/converting.md's "
        f"quality table ({best['agreement']:.1%}; 4-bit: {base['agreement']:.1%}) within {SIZE_BUDGET:g}x "
        f"the 4-bit size ({ratio:.2f}x here)."
    )
    if by_task(candidates(rows, base, SIZE_BUDGET, size_of)):
        h = best["humaneval"]
        reason += (
            f" Chosen first by HumanEval pass@1 on {h['problems']} problems ({h['pass@1']:.1f} ± {h['stderr']:.1f}; "
            f"rows within one standard error of the best were kept, then ranked by agreement)."
        )
    return Choice(options_for(best), reason)
