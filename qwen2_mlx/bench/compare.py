"""Benchmark generation speed against mlx-lm on the same model folder: `python -m qwen2_mlx.bench`.

Both libraries load the same folder in one process and run the same random prompt, alternating
(ours, mlx-lm, ours, ...) after one warm-up run each, so load on a shared machine hits both alike.
Reported per run: prefill tok/s, time to first token, decode tok/s and peak memory (the run's peak
above what was allocated before it, plus the library's own weights, so the other library's copy of
the model does not count). Medians and our/mlx-lm ratios follow, then the bandwidth roofline: bytes
read per decoded token (weights each token reads plus the KV cache) against a measured bandwidth (the
faster of a large copy and a large float32 matrix-vector product).

`--random PRESET` writes (once, then reuses) a folder with random weights of a real Qwen2 shape, so
the benchmark runs on a machine without a model and without network.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from qwen2_mlx.arguments import add_kv_cache_args, kv_cache_settings

# mlx, mlx-lm and our package are imported in main(), after the OpenBLAS re-exec.

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    from qwen2_mlx.loading.paths import default_model_path

    from .presets import PRESETS

    ap = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help=f"model folder (default: {default_model_path()}, what `python convert.py` wrote)")
    src.add_argument(
        "--random",
        choices=sorted(PRESETS),
        metavar="PRESET",
        help=f"random weights of a real shape: {', '.join(PRESETS)}",
    )
    ap.add_argument("--random-dir", help="where --random writes its folder (default: ~/.cache/qwen2-mlx/random)")
    ap.add_argument("--compare-mlx-lm", action="store_true", help="also run mlx-lm on the same folder")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    ap.add_argument(
        "--gen-tokens",
        type=int,
        default=None,
        help="tokens to generate (default 64; with --lookup/--draft-model: per task)",
    )
    ap.add_argument(
        "--dtype",
        choices=DTYPES,
        help="cast weights to this dtype (default: as stored; --random: float32 on a CPU, else bfloat16)",
    )
    ap.add_argument("--dca-chunk-size", type=int, help="switch Dual Chunk Attention on (ours only)")
    ap.add_argument("--dca-local-size", type=int, help="DCA local window (default: chunk size / 8)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per library (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    ap.add_argument("--json", metavar="FILE", help="also write all figures to FILE as JSON")
    add_kv_cache_args(ap)  # both libraries take mlx-lm's kv_bits, kv_group_size, quantized_kv_start
    spec = ap.add_argument_group("speculative decoding (bench/speculative.py: the task set, plain against speculative)")
    spec.add_argument("--lookup", action="store_true", help="prompt lookup against plain decoding on the task set")
    spec.add_argument("--draft-model", metavar="PATH", help="a draft model against plain decoding on the task set")
    spec.add_argument("--num-draft-tokens", type=int, default=3, help="tokens the draft proposes per step (default 3)")
    spec.add_argument("--tasks-file", metavar="FILE", help="another task set (default: bench/tasks/speculative.json)")
    spec.add_argument("--task", action="append", metavar="NAME", help="run only this task (repeatable)")
    args = ap.parse_args(argv)
    if args.model is None and args.random is None:
        args.model = str(default_model_path())
    speculative = args.lookup or args.draft_model
    if speculative:
        if args.lookup and args.draft_model:
            ap.error("choose --lookup or --draft-model, not both")
        if not args.model:
            ap.error("--lookup and --draft-model need --model (a real tokenizer for the task set)")
        if args.num_draft_tokens < 1:
            ap.error("--num-draft-tokens must be at least 1")
        if args.gen_tokens is not None and args.gen_tokens < 1:
            ap.error("--gen-tokens must be at least 1")
        if args.runs < 1:
            ap.error("--runs must be at least 1")
        return args
    if args.gen_tokens is None:
        args.gen_tokens = 64
    for name in ("prompt_tokens", "gen_tokens", "runs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.gen_tokens < 2:
        ap.error("--gen-tokens must be at least 2 (decode speed needs a token after the first)")
    if args.dca_local_size is not None and args.dca_chunk_size is None:
        ap.error("--dca-local-size needs --dca-chunk-size")
    if args.dca_chunk_size is not None and args.dca_chunk_size < 2:
        ap.error("--dca-chunk-size must be at least 2")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def copy_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Bytes per second of a large elementwise copy on the default device (read + write counted)."""
    import mlx.core as mx

    a = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        b = a * 1.0
        mx.eval(b)
        best = min(best, time.perf_counter() - t)
        del b
    return 2 * a.nbytes / best


def matvec_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Bytes per second a float32 matrix-vector product streams its matrix at (decode's access pattern).

    On a CPU, MLX runs elementwise copies on one thread while BLAS uses all cores, so the copy alone
    understates what decoding can reach; the roofline takes the larger of the two."""
    import mlx.core as mx

    n = int((nbytes // 4) ** 0.5)
    w = mx.random.uniform(shape=(n, n))
    x = mx.random.uniform(shape=(1, n))
    mx.eval(w, x)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(x @ w.T)
        best = min(best, time.perf_counter() - t)
    return w.nbytes / best


def weight_bytes(model, args) -> tuple[int, int]:
    """(all weight bytes, bytes one decoded token reads): one embedding row unless the head is tied,
    and only the routed share (top-k of n experts) of stacked expert weights. `args`: our ModelArgs."""
    from mlx.utils import tree_flatten

    total = per_token = 0
    for name, p in tree_flatten(model.parameters()):
        total += p.nbytes
        if name.startswith("model.embed_tokens.") and not args.tie_word_embeddings:
            per_token += p.nbytes // p.shape[0]
        elif ".switch_mlp." in name and getattr(args, "num_experts", 0):
            per_token += p.nbytes * args.num_experts_per_tok // args.num_experts
        else:
            per_token += p.nbytes
    return total, per_token


def kv_bytes_per_position(model, itemsize: int) -> int:
    a = model.args
    return 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * itemsize


def time_run(step_fn: Callable, model, prompt, gen_tokens: int, own_weights: int) -> dict:
    """One generation of `gen_tokens` greedy tokens; returns its figures and tokens."""
    import mlx.core as mx

    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    tokens = []
    t0 = time.perf_counter()
    t1 = t0
    for i, (tok, _) in enumerate(step_fn(prompt, model, max_tokens=gen_tokens)):
        if i == 0:
            t1 = time.perf_counter()
        tokens.append(int(tok))
    t2 = time.perf_counter()
    ttft = t1 - t0
    return {
        "ttft_s": ttft,
        "prefill_tps": prompt.size / ttft,
        "decode_tps": (len(tokens) - 1) / (t2 - t1),
        "peak_memory_gb": (mx.get_peak_memory() - base + own_weights) / 1e9,
        "tokens": tokens,
    }


def summarize(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in ("prefill_tps", "ttft_s", "decode_tps", "peak_memory_gb")}


def machine_description() -> dict:
    import mlx.core as mx

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "device": str(mx.default_device()),
        "cpu_count": os.cpu_count(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }
    try:
        info["device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except Exception:  # not every backend describes itself
        pass
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mlx", "mlx-lm", "qwen2-mlx", "mlx-cpu", "mlx-cuda-13", "mlx-cuda-12", "mlx-metal"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _against_mlx_lm(medians: dict, runs: dict) -> dict:
    """Our figures over mlx-lm's, and whether the greedy tokens agree."""
    out = {}
    a, b = medians["qwen2_mlx"], medians["mlx_lm"]
    out["ratio_ours_over_mlx_lm"] = {
        "prefill_tps": a["prefill_tps"] / b["prefill_tps"],
        "decode_tps": a["decode_tps"] / b["decode_tps"],
        "ttft_s": a["ttft_s"] / b["ttft_s"],
        "peak_memory_gb": a["peak_memory_gb"] / b["peak_memory_gb"],
    }
    # Each run of ours is paired with the mlx-lm run right after it: on a loaded machine the median of
    # these per-pair ratios is steadier than the ratio of the medians.
    out["paired_ratio_median"] = {
        k: statistics.median(x[k] / y[k] for x, y in zip(runs["qwen2_mlx"], runs["mlx_lm"]))
        for k in ("prefill_tps", "decode_tps")
    }
    ours_tokens, their_tokens = runs["qwen2_mlx"][0]["tokens"], runs["mlx_lm"][0]["tokens"]
    diff = next((i for i, (x, y) in enumerate(zip(ours_tokens, their_tokens)) if x != y), None)
    out["greedy_tokens_match_mlx_lm"] = diff is None
    out["first_token_difference"] = diff
    return out


def _roofline(ours, args, medians: dict, on_cpu: bool) -> dict:
    """The decode rate bandwidth allows: a decoded token must stream the weights it uses plus the KV cache once."""
    _, per_tok = weight_bytes(ours, ours.args)
    itemsize = ours.model.norm.weight.itemsize
    if kv_cache_settings(args)["kv_bits"]:  # packed values plus a scale and a bias per group
        itemsize = (8 if args.kv_bits == "auto" else args.kv_bits) / 8 + 2 * itemsize / args.kv_group_size
    context = args.prompt_tokens + args.gen_tokens / 2
    kv = kv_bytes_per_position(ours, itemsize) * context
    size = (256 << 20) if on_cpu else (2 << 30)
    copy_bw, matvec_bw = copy_bandwidth(size), matvec_bandwidth(size)
    bw = max(copy_bw, matvec_bw)
    bytes_per_token = per_tok + kv
    return {
        "weight_bytes_per_token": per_tok,
        "kv_bytes_per_token": kv,
        "bytes_per_token": bytes_per_token,
        "copy_bandwidth_gbs": copy_bw / 1e9,
        "matvec_bandwidth_gbs": matvec_bw / 1e9,
        "bandwidth_gbs": bw / 1e9,
        "roofline_decode_tps": bw / bytes_per_token,
        "fraction": {n: m["decode_tps"] * bytes_per_token / bw for n, m in medians.items()},
    }


def _model_path(args: argparse.Namespace, on_cpu: bool) -> tuple[Path, Optional[str]]:
    """The model folder and dtype to run: `--model`, or random weights of a `--random` preset written once."""
    import mlx.core as mx

    from .random_model import write_random_model

    if not args.random:
        return Path(args.model).expanduser(), args.dtype
    dtype_name = args.dtype or ("float32" if on_cpu else "bfloat16")
    base = (
        Path(args.random_dir).expanduser()
        if args.random_dir
        else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen2-mlx" / "random"
    )
    path = base / f"{args.random}-{dtype_name}"
    log(f"random weights of {args.random} ({dtype_name}) in {path} ...")
    write_random_model(args.random, path, getattr(mx, dtype_name))
    return path, dtype_name


def run_benchmark(args: argparse.Namespace) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from qwen2_mlx import load as load_ours
    from qwen2_mlx.generation.generate import generate_step as ours_step

    on_cpu = mx.default_device().type == mx.cpu
    path, dtype_name = _model_path(args, on_cpu)
    dtype = getattr(mx, dtype_name) if dtype_name else None

    dca = None
    if args.dca_chunk_size is not None:
        local = args.dca_local_size if args.dca_local_size is not None else max(1, args.dca_chunk_size // 8)
        dca = {"chunk_size": args.dca_chunk_size, "local_size": local}

    log(f"loading {path} with qwen2_mlx ...")
    ours, _ = load_ours(path, dca=dca, dtype=dtype)
    libs = [("qwen2_mlx", ours, ours_step)]
    if args.compare_mlx_lm:
        import mlx_lm
        from mlx_lm.generate import generate_step as theirs_step

        log(f"loading {path} with mlx_lm ...")
        theirs, _ = mlx_lm.load(str(path), lazy=True)
        try:  # the same tensors as ours (identical names): one copy of the weights in memory, not two
            theirs.load_weights(list(tree_flatten(ours.parameters())), strict=True)
        except ValueError:  # a layout mlx-lm names differently: its own copy
            if dtype is not None:
                theirs.set_dtype(dtype)
        mx.eval(theirs.parameters())
        libs.append(("mlx_lm", theirs, theirs_step))
    weights = {name: weight_bytes(m, ours.args)[0] for name, m, _ in libs}
    kv = kv_cache_settings(args)
    if kv["kv_bits"] is not None:  # "auto" resolved for this model: mlx-lm takes the bits and the start
        from qwen2_mlx.generation.kv_quant import KVQuantization

        kv = KVQuantization.make(**kv, model=ours).to_dict()
        libs = [(name, m, functools.partial(step, **kv)) for name, m, step in libs]

    mx.random.seed(args.seed)
    prompt = mx.random.randint(0, ours.args.vocab_size, (args.prompt_tokens,)).astype(mx.uint32)
    mx.eval(prompt)
    for name, model, step in libs:
        log(f"warm-up: {name}")
        time_run(step, model, prompt, args.gen_tokens, weights[name])
    runs = {name: [] for name, _, _ in libs}
    for r in range(args.runs):
        for name, model, step in libs:
            res = time_run(step, model, prompt, args.gen_tokens, weights[name])
            runs[name].append(res)
            log(
                f"run {r + 1}/{args.runs} {name:9s} prefill {res['prefill_tps']:8.1f} tok/s  "
                f"ttft {res['ttft_s'] * 1e3:8.1f} ms  decode {res['decode_tps']:7.2f} tok/s  "
                f"peak {res['peak_memory_gb']:.3f} GB"
            )

    medians = {name: summarize(rs) for name, rs in runs.items()}
    result = {
        "model": str(path),
        "random_preset": args.random,
        "dtype": dtype_name or "as stored",
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "runs": args.runs,
        "dca": dca,
        **kv_cache_settings(args),
        "machine": machine_description(),
        "versions": versions(),
        "per_run": {n: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for n, rs in runs.items()},
        "median": medians,
    }
    if "mlx_lm" in medians:
        result.update(_against_mlx_lm(medians, runs))
    result["roofline"] = _roofline(ours, args, medians, on_cpu)
    return result


def report(res: dict) -> str:
    lines = [
        f"model: {res['model']}  dtype: {res['dtype']}  prompt {res['prompt_tokens']} tokens, "
        f"generate {res['gen_tokens']}, {res['runs']} runs (medians)",
        f"device: {res['machine']['device']}  {res['machine'].get('cpu', '')}  "
        f"versions: {', '.join(f'{k} {v}' for k, v in res['versions'].items())}",
    ]
    if res["dca"]:
        lines.append(f"DCA on for qwen2_mlx: {res['dca']} (mlx-lm has no DCA: full attention)")
    lines.append(
        f"{'':12s}{'prefill tok/s':>15s}{'TTFT ms':>10s}{'decode tok/s':>14s}{'peak GB':>10s}{'roofline':>10s}"
    )
    roof = res["roofline"]
    for name, m in res["median"].items():
        lines.append(
            f"{name:12s}{m['prefill_tps']:15.1f}{m['ttft_s'] * 1e3:10.1f}{m['decode_tps']:14.2f}"
            f"{m['peak_memory_gb']:10.3f}{roof['fraction'][name] * 100:9.1f}%"
        )
    if "ratio_ours_over_mlx_lm" in res:
        r = res["ratio_ours_over_mlx_lm"]
        lines.append(
            f"{'ours/mlx-lm':12s}{r['prefill_tps']:14.2f}x{r['ttft_s']:9.2f}x{r['decode_tps']:13.2f}x"
            f"{r['peak_memory_gb']:9.2f}x"
        )
        p = res["paired_ratio_median"]
        lines.append(
            f"{'paired runs':12s}{p['prefill_tps']:14.2f}x{'':10s}{p['decode_tps']:13.2f}x"
            "   (median of per-pair ratios)"
        )
        same = (
            "yes"
            if res["greedy_tokens_match_mlx_lm"]
            else f"no (first difference at token {res['first_token_difference']})"
        )
        lines.append(f"greedy tokens identical to mlx-lm: {same}")
    lines.append(
        f"roofline: {roof['bytes_per_token'] / 1e9:.3f} GB read per decoded token "
        f"(weights {roof['weight_bytes_per_token'] / 1e9:.3f} GB + KV cache {roof['kv_bytes_per_token'] / 1e6:.1f} MB) "
        f"at a measured bandwidth of {roof['bandwidth_gbs']:.1f} GB/s (copy {roof['copy_bandwidth_gbs']:.1f}, "
        f"float32 matvec {roof['matvec_bandwidth_gbs']:.1f}) "
        f"-> at most {roof['roofline_decode_tps']:.1f} tok/s"
    )
    return "\n".join(lines)


def check_outputs(args: argparse.Namespace) -> Optional[str]:
    """What the results need, checked before the benchmark starts: the problem in one line, or None."""
    if args.json:
        path = Path(args.json).expanduser()
        if path.is_dir():
            return f"--json {args.json}: is a folder; expected a file"
        if not path.parent.is_dir():
            return f"--json {args.json}: folder {path.parent} does not exist"
    return None


def write_json(path: str, res: dict) -> None:
    """Write the figures atomically: a reader (or a crash) never leaves half a file."""
    path = Path(path).expanduser()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, path)


def report_identical(out: dict, json_path) -> int:
    """Print a benchmark's figures (and write them to `json_path`); exit 0 only when its replies matched."""
    print(json.dumps(out, indent=1))
    if json_path:
        write_json(str(json_path), out)
    return 0 if out["identical_reply"] else 1


def main(argv: Optional[list] = None) -> int:
    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)
    args = parse_args(argv)
    if args.model and not Path(args.model).expanduser().is_dir():
        print(f"error: {args.model}: no such model folder", file=sys.stderr)
        return 2
    problem = check_outputs(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.draft_model and not Path(args.draft_model).expanduser().is_dir():
        print(f"error: {args.draft_model}: no such model folder", file=sys.stderr)
        return 2
    from . import speculative

    try:
        if args.lookup or args.draft_model:
            speculative.load_tasks(args.tasks_file, args.task)  # a bad task file stops us before loading
            res = speculative.run(args, log)
        else:
            res = run_benchmark(args)
    except (ValueError, OSError) as e:  # bad folders (ModelLoadError, ConfigError) and unwritable paths
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:  # the figures first, then the table made from them
        write_json(args.json, res)
        log(f"figures written to {args.json}")
    print(speculative.report(res) if "by_kind" in res else report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
