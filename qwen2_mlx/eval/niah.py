"""Needle in a haystack: retrieval over a grid of context lengths x needle depths, drawn as a heatmap.

Each cell asks for a 7-digit "special magic number" (RULER's single-needle task) hidden in varied
filler at that depth; the cell's score is the fraction of its trials answered exactly. The figure
follows the Qwen2 report's: context length on x, depth percent on y, red (not found) to green
(found).
"""

from __future__ import annotations

import random
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .prompts import niah_prompt
from .results import ResultsFile
from .retrieval import answer, trial_settings

MAX_NEW_TOKENS = 12  # a space, seven digits and a full stop, with room to spare
# The red-yellow-green scale of the Needle-in-a-Haystack figures (Qwen2 report, gkamradt's test).
COLORS = ["#F0496E", "#EBB839", "#0CD79F"]


def cell_seed(seed: int, length: int, depth: int, trial: int) -> int:
    return random.Random(f"niah:{seed}:{length}:{depth}:{trial}").randrange(1 << 31)


def run_niah(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[int],
    trials: int = 1,
    seed: int = 0,
    haystack: Optional[Sequence[str]] = None,
    results: Optional[ResultsFile] = None,
    prefill_step_size: int = 512,
    bar=None,
    kv: Optional[dict] = None,
) -> dict:
    """Run (or resume) the grid; `scores[d][l]` is the fraction found at depths[d] %, lengths[l] tokens."""
    settings = trial_settings(MAX_NEW_TOKENS, prefill_step_size, kv)
    results = results or ResultsFile(None, {})
    scores, cells = [], []
    for depth in depths:
        row = []
        for length in lengths:
            found = 0
            for t in range(trials):
                unit = f"{length}:{depth}:{t}"
                record = results.get(unit)
                if record is None:
                    prompt = niah_prompt(tokenizer, length, depth / 100, cell_seed(seed, length, depth, t), haystack)
                    record = results.add(
                        {
                            "id": unit,
                            "length": length,
                            "depth": depth,
                            "trial": t,
                            **answer(model, tokenizer, prompt, settings, bar),
                        }
                    )
                cells.append(record)
                found += bool(record["ok"])
                if bar is not None:
                    bar.update(1)
            row.append(found / trials)
        scores.append(row)
    flat = [s for row in scores for s in row]
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": trials,
        "scores": scores,
        "accuracy": sum(flat) / len(flat),
        "cells": cells,
    }


def plot_heatmap(grid: dict, out: Path, title: str) -> None:
    """Write the grid as a PNG heatmap (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("niah", COLORS)
    lengths, depths, scores = grid["lengths"], grid["depths"], grid["scores"]
    width = max(6.0, 1.0 + 0.75 * len(lengths))
    height = max(3.0, 1.2 + 0.45 * len(depths))
    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    im = ax.imshow(scores, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}" for d in depths])
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Needle depth (%)")
    # Thin white borders between cells, as in the report's figure.
    ax.set_xticks([x - 0.5 for x in range(1, len(lengths))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(depths))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    if grid.get("trials", 1) > 1:
        for d, row in enumerate(scores):
            for col, s in enumerate(row):
                ax.text(col, d, f"{s:.2f}", ha="center", va="center", fontsize=8, color="black")
    fig.colorbar(im, ax=ax, label="Score", fraction=0.046, pad=0.04)
    # Wrap long titles (model name plus settings) to the figure's width instead of clipping them.
    ax.set_title("\n".join(textwrap.fill(line, width=int(width * 12)) for line in title.splitlines()), fontsize=10)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else (f"{n / 1000:g}k" if n >= 1000 else str(n))


def format_report(grid: dict) -> str:
    lengths = grid["lengths"]
    lines = [f"accuracy: {grid['accuracy']:.3f}", "depth% \\ length " + " ".join(f"{n:>7}" for n in lengths)]
    for depth, row in zip(grid["depths"], grid["scores"]):
        lines.append(f"{depth:>16} " + " ".join(f"{s:>7.2f}" for s in row))
    return "\n".join(lines)
