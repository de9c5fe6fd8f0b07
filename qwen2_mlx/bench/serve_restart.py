"""`python -m qwen2_mlx.bench.serve_restart`: a long prompt's first token after a server restart.

Starts `qwen2-serve` with a fresh `--cache-dir`, sends a system prompt of about `--context` tokens
(the project's own source) and a question, stops the server, starts a new process on the same
folder and sends the same request again. Prints the time to first token cold and after the restart,
the cached tokens the second reply reports, and whether the two replies are identical (greedy).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Optional

from .compare import report_identical
from .serve import Server, conversation, stream_chat


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2_mlx.bench.serve_restart", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder (float32 is the fast type on a CPU)")
    p.add_argument("--context", type=int, default=2000, help="tokens in the system prompt (default 2000)")
    p.add_argument("--max-tokens", type=int, default=24, help="reply length (default 24)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    name = Path(args.model).resolve().name
    messages = [
        {"role": "system", "content": conversation(args.context)},
        {"role": "user", "content": "What does stream_generate return?"},
    ]
    runs = []
    with tempfile.TemporaryDirectory(prefix="qwen2-restart-") as tmp:
        for label in ("cold", "after restart"):
            server = Server("qwen2-serve", args.model, ["--cache-dir", str(Path(tmp) / "cache")], Path(tmp))
            try:
                r = stream_chat(server.url, name, messages, args.max_tokens)
            finally:
                server.stop()
            runs.append(r)
            figures = f"TTFT {r['ttft']:.2f}s, {r['prompt_tokens']} prompt tokens, {r['cached']} cached"
            print(f"{label}: {figures}", flush=True)
    cold, warm = runs
    out = {
        "prompt_tokens": cold["prompt_tokens"],
        "ttft_cold_s": round(cold["ttft"], 3),
        "ttft_after_restart_s": round(warm["ttft"], 3),
        "cached_tokens_after_restart": warm["cached"],
        "ratio": round(warm["ttft"] / cold["ttft"], 4),
        "identical_reply": cold["text"] == warm["text"],
    }
    return report_identical(out, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
