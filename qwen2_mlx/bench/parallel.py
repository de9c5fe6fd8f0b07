"""Benchmark: tensor against pipeline parallelism on local ranks, with one process as the reference.

    python -m qwen2_mlx.bench.parallel [--model PATH] [--ranks 2] [--prompt-tokens 512] [--gen-tokens 64]

Each mode loads the model (`sharded_load(parallel=)`, one process for "single"), prefills one prompt of
`--prompt-tokens` tokens and decodes `--gen-tokens` greedily with the end-of-turn token suppressed, then
decodes `--streams` prompts together (`batch_generate`, the batched forward the server's continuous
batching runs) and reports their aggregate decode rate. Rank 0 reports its peak memory (MLX allocator
and process RSS). The ranks run under `mlx.launch --backend ring` on this machine; they share its cores.
Prints one table on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("single", "tensor", "pipeline")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.parallel", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: the folder `python convert.py` writes)")
    p.add_argument("--ranks", type=int, default=2, help="ranks for tensor and pipeline (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (default: %(default)s)")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens decoded alone (default: %(default)s)")
    p.add_argument("--streams", type=int, default=4, help="prompts decoded together (default: %(default)s)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of %(default)s")
    p.add_argument("--dtype", default="float32", help="weights' dtype (default: %(default)s, fastest on a CPU)")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)  # one rank's part, run by the driver
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def _prompt(tokenizer, n: int) -> list[int]:
    """`n` tokens of this package's own source: real text, the same in every mode."""
    text = "".join(p.read_text() for p in sorted(Path(__file__).resolve().parent.parent.rglob("*.py")))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n:
        raise ValueError(f"--prompt-tokens {n} is more than the {len(ids)} tokens of text available")
    return ids[:n]


def _work(args) -> dict:
    """One rank's measurements (the process's group is its mode's: one process, or the launched ranks)."""
    import mlx.core as mx

    from qwen2_mlx.distributed import peak_rss_gb
    from qwen2_mlx.generation.batch import batch_generate
    from qwen2_mlx.generation.generate import stream_generate
    from qwen2_mlx.generation.settings import GenerationSettings
    from qwen2_mlx.loading.paths import default_model_path
    from qwen2_mlx.loading.sharded import sharded_load

    group = mx.distributed.init()
    parallel = "tensor" if args.worker == "single" else args.worker
    path = args.model or default_model_path()
    model, tokenizer = sharded_load(path, group, dtype=getattr(mx, args.dtype), parallel=parallel)
    loaded = mx.get_peak_memory() / 1e9
    prompt = _prompt(tokenizer, args.prompt_tokens)
    no_eos = GenerationSettings(logit_bias={t: -1e9 for t in tokenizer.eos_token_ids})
    list(stream_generate(model, tokenizer, prompt[:16], 2, settings=no_eos))  # warm-up
    last = list(stream_generate(model, tokenizer, prompt, args.gen_tokens, settings=no_eos))[-1]
    # Each stream its own slice of the text, so the rows differ.
    step = args.prompt_tokens // (2 * args.streams)
    prompts = [prompt[i * step : i * step + 128] for i in range(args.streams)]
    tic = time.perf_counter()
    batch = batch_generate(model, tokenizer, prompts, max_tokens=args.gen_tokens, settings=no_eos)
    return {
        "mode": args.worker,
        "ranks": group.size(),
        "prefill_tps": last.prompt_tps,
        "decode_tps": last.generation_tps,
        "streams_tps": batch.stats.generation_tps,
        "streams_wall": time.perf_counter() - tic,
        "loaded_gb": loaded,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "rss_gb": peak_rss_gb(),
    }


def _free_ports(n: int) -> int:
    """A first port p with p..p+n-1 free: the ring backend listens on consecutive ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            start = s.getsockname()[1]
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", start + i))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def _run_mode(mode: str, args, argv: list[str]) -> dict:
    """Start one mode's processes and return rank 0's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        worker = [sys.executable, "-m", "qwen2_mlx.bench.parallel", *argv, "--worker", mode, "--out", str(out)]
        env = dict(os.environ)
        if mode == "single":
            cmd = worker
        else:
            launcher = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; main()"]
            ring = ["-n", str(args.ranks), "--backend", "ring", "--starting-port", str(_free_ports(args.ranks))]
            cmd = launcher + ring + ["--"] + worker
            env["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.ranks))  # the ranks share cores
        print(f"[bench.parallel] {mode} ...", file=sys.stderr, flush=True)
        r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"{mode} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def _table(rows: list[dict], args) -> str:
    lines = [
        f"prompt {args.prompt_tokens} tok, decode {args.gen_tokens} tok, "
        f"{args.streams} streams x {args.gen_tokens} tok",
        f"{'mode':10}{'ranks':>6}{'prefill tok/s':>15}{'decode tok/s':>14}"
        f"{f'{args.streams} streams tok/s':>18}{'rank 0 peak (MLX)':>19}{'rank 0 RSS':>12}",
    ]
    for r in rows:
        lines.append(
            f"{r['mode']:10}{r['ranks']:>6}{r['prefill_tps']:>15.1f}{r['decode_tps']:>14.1f}"
            f"{r['streams_tps']:>18.1f}{r['peak_gb']:>16.2f} GB{r['rss_gb']:>9.2f} GB"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    from qwen2_mlx.runtime.blas import ensure_openblas

    ensure_openblas(argv)  # Linux CPU: re-run with OpenBLAS preloaded (runtime/blas.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes takes a comma-separated subset of {','.join(MODES)}")
    if min(args.ranks, args.prompt_tokens, args.gen_tokens, args.streams) < 1:
        p.error("--ranks, --prompt-tokens, --gen-tokens and --streams must be positive")
    if args.worker:
        figures = _work(args)
        import mlx.core as mx

        if mx.distributed.init().rank() == 0:
            Path(args.out).write_text(json.dumps(figures))
        return 0
    from qwen2_mlx.loading.loader import ModelLoadError, resolve_path
    from qwen2_mlx.loading.paths import default_model_path

    try:
        resolve_path(args.model or default_model_path())  # a missing folder: one line, before any launch
        rows = [_run_mode(m, args, argv) for m in modes]
    except (RuntimeError, ValueError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
