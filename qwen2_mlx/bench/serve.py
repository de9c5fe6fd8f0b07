"""`python -m qwen2_mlx.bench.serve`: qwen2-serve under load, and mlx-lm's server on the same folder.

Starts each server as a process on a free port and drives it over HTTP (streamed Chat Completions):

1. Time to first token of the last turn of a long conversation (default: turn 5 of ~4K tokens), with
   the cross-request prefix cache (turns 1-4 ran first, so only the new turn is prefilled) and
   without it (the same request with its first character changed, so no cached prefix applies:
   the whole conversation is prefilled, as a server without the cache does). Alternated, median.
2. Aggregate decode throughput for 1, 4 and 8 concurrent streams: the completion tokens of all
   streams over the wall time from the first request to the last token, prompts short enough
   that decoding dominates.

Figures go to stdout (and `--json`); run it under the bench lock on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

DOC_FILES = ("qwen2_mlx/generation/generate.py", "qwen2_mlx/generation/chat.py")
QUESTIONS = [
    "Summarize what stream_generate does in two sentences.",
    "Which finish reasons can a reply have?",
    "How are stop strings kept out of the text?",
    "What does the Chat class keep between turns?",
    "Name one thing that makes decoding fast.",
]
STORIES = ["a lighthouse keeper", "a lost robot", "a dragon who bakes", "two rival chess clubs"] * 4


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process (ours or mlx-lm's) on a free port, stopped on exit."""

    def __init__(self, kind: str, model: str, extra: list, log_dir: Path):
        self.kind, self.port = kind, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if kind == "qwen2-serve":
            cmd = [sys.executable, "-m", "qwen2_mlx.serve", "--model", model, "--port", str(self.port)]
            cmd += ["--log-level", "warning", "--max-concurrency", "8", *extra]
        else:
            cmd = [sys.executable, "-m", "mlx_lm.server", "--model", model, "--port", str(self.port), *extra]
            from qwen2_mlx.runtime.blas import OPENBLAS_PATHS  # the same BLAS as ours, for a fair float32 run

            lib = next((p for p in OPENBLAS_PATHS if os.path.exists(p)), None)
            if lib and sys.platform.startswith("linux"):
                env["LD_PRELOAD"] = lib
        self.log = log_dir / f"{kind}.log"
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.kind} did not start in {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def stream_chat(url: str, model: str, messages: list, max_tokens: int) -> dict:
    """One streamed request: time to first token, the text, completion tokens and end time."""
    import httpx

    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, parts, usage = None, [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                text = (c.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
    end = time.perf_counter()
    return {
        "ttft": (first or end) - t0,
        "text": "".join(parts),
        "tokens": (usage or {}).get("completion_tokens", len(parts)),
        "cached": ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens"),
        "prompt_tokens": (usage or {}).get("prompt_tokens"),
        "start": t0,
        "end": end,
    }


def conversation(context_tokens: int) -> str:
    """A system prompt of about `context_tokens` tokens: the project's own source (4 chars a token)."""
    root = Path(__file__).resolve().parents[2]
    text = "\n\n".join((root / f).read_text(encoding="utf-8") for f in DOC_FILES)
    while len(text) < context_tokens * 4:
        text += "\n\n" + text
    return "Answer questions about this code.\n\n" + text[: context_tokens * 4]


def bench_ttft(server: Server, model: str, context: int, turns: int, repeats: int) -> dict:
    """TTFT of turn `turns` with and without the prefix cache (alternating, median of `repeats`)."""
    system = conversation(context - 200 * (turns - 1))
    msgs = [{"role": "system", "content": system}]
    for q in QUESTIONS[: turns - 1]:
        msgs.append({"role": "user", "content": q})
        r = stream_chat(server.url, model, msgs, 48)
        msgs.append({"role": "assistant", "content": r["text"]})
    last = msgs + [{"role": "user", "content": QUESTIONS[turns - 1]}]
    warm, cold, info = [], [], {}
    for i in range(repeats):
        for mode in ("cold", "warm") if i % 2 == 0 else ("warm", "cold"):
            if mode == "warm":
                r = stream_chat(server.url, model, last, 4)
                warm.append(r["ttft"])
                info["warm_cached"] = r["cached"]
            else:  # a different first character: no cached prefix applies
                busted = [{"role": "system", "content": f"#{i} " + system}] + last[1:]
                r = stream_chat(server.url, model, busted, 4)
                cold.append(r["ttft"])
                info["cold_cached"] = r["cached"]
            info["prompt_tokens"] = r["prompt_tokens"]
            # the cold request's cache is the same conversation under another prefix; the warm one
            # must still find turn 4's (or its own last) entry
    return dict(info, ttft_cached_s=statistics.median(warm), ttft_uncached_s=statistics.median(cold))


def bench_streams(server: Server, model: str, counts: list, max_tokens: int) -> dict:
    out = {}
    for n in counts:
        results: list = [None] * n

        def run(i, results=results):
            msgs = [{"role": "user", "content": f"Write a long story about {STORIES[i]}. {i}"}]
            results[i] = stream_chat(server.url, model, msgs, max_tokens)

        stream_chat(server.url, model, [{"role": "user", "content": "warm up"}], 4)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = max(r["end"] for r in results) - t0
        tokens = sum(r["tokens"] for r in results)
        out[n] = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}
        print(f"  {server.kind}: {n} streams, {tokens} tokens in {wall:.1f}s = {tokens / wall:.1f} tok/s", flush=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    from qwen2_mlx.loading.paths import default_model_path

    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.serve", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default=str(default_model_path()),
        help="model folder (default: %(default)s)",
    )
    p.add_argument("--context", type=int, default=4000, help="tokens in the conversation (default 4000)")
    p.add_argument("--turns", type=int, default=5, choices=range(2, 6), help="the turn timed (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="alternated TTFT repeats (default 3)")
    p.add_argument("--streams", default="1,4,8", help="concurrent streams (default 1,4,8)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (default 64)")
    p.add_argument("--compare-mlx-lm", action="store_true", help="run the same load against mlx_lm.server")
    p.add_argument("--skip-ttft", action="store_true", help="only the concurrency figures")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    return p


def main(argv: Optional[list] = None) -> int:
    from qwen2_mlx.arguments import int_list

    p = build_parser()
    args = p.parse_args(argv)
    try:
        counts = int_list(args.streams, "--streams", minimum=1)
    except ValueError as e:
        p.error(str(e))
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there")
    import tempfile

    model = Path(args.model).resolve().name
    results: dict = {}
    with tempfile.TemporaryDirectory() as logs:
        for kind in ["qwen2-serve"] + (["mlx_lm.server"] if args.compare_mlx_lm else []):
            print(f"starting {kind} on {args.model}", flush=True)
            server = Server(kind, args.model, [], Path(logs))
            name = model if kind == "qwen2-serve" else args.model
            try:
                res: dict = {}
                if not args.skip_ttft:
                    res["ttft"] = bench_ttft(server, name, args.context, args.turns, args.repeats)
                    t = res["ttft"]
                    print(
                        f"  {kind}: turn {args.turns} of {t['prompt_tokens']} tokens: TTFT {t['ttft_cached_s']:.2f}s "
                        f"with the prefix cache (cached {t['warm_cached']}), {t['ttft_uncached_s']:.2f}s without",
                        flush=True,
                    )
                res["streams"] = bench_streams(server, name, counts, args.max_tokens)
                results[kind] = res
            finally:
                server.stop()
    print("\nsummary")
    for kind, res in results.items():
        s = res["streams"]
        line = ", ".join(f"{n} streams {v['tokens_per_s']:.1f} tok/s" for n, v in s.items())
        if 1 in s and 4 in s:
            line += f"; 4 streams / 1 = {s[4]['tokens_per_s'] / s[1]['tokens_per_s']:.2f}x"
        if "ttft" in res:
            t = res["ttft"]
            line += f"; TTFT turn {args.turns}: {t['ttft_cached_s']:.2f}s cached vs {t['ttft_uncached_s']:.2f}s"
        print(f"  {kind}: {line}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
