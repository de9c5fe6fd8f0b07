#!/usr/bin/env python3
"""Issue 16's GPU run: tests, long-context NIAH/passkey on the real model, and speed, sized to one lease.

Subcommands (scripts/gpu_run.sh and scripts/gpu_prepare.sh call these; docs/gpu-run.md is the guide):

  prepare  (here)   cut what must travel (wheels as one xz-compressed tree, the real model's GGUF) into
                    per-call folders .carry/call-K of at most --call-bytes each, with a manifest
  device   (there)  stage the pieces this call carried, unpack the wheels and convert the model once they
                    are complete, start the step driver in the background (setsid) if it is not running,
                    wait --wait seconds (or until it is done), copy the results to $OUT, print the summary
  drive             the step driver: runs the pending steps in priority order, each under its own timeout,
                    appending one JSON line per finished step to RESULTS/steps.jsonl (a rerun skips them)
  summary           print (and write RESULTS/summary.txt) the summary of RESULTS/steps.jsonl
  bench             `python -m qwen2_mlx.bench` with the rehearsal's tiny presets registered and an optional
                    quantization of the random folder first (--quantize-bits)

GPU_RUN_REHEARSAL=1 (or --rehearsal) swaps in tiny models, tiny lengths and a short test selection, and
needs no wheels: the same code path end to end on a CPU in about a minute.
Only the standard library is imported at the top: `prepare`, `device` and `summary` run before the
carried wheels are unpacked.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MODEL_NAME = "qwen2.5-coder-0.5b-instruct-bf16"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
# The real model's config.json (as converted from the GGUF): bench.long --random-weights reads only this.
REAL_CONFIG = dict(
    architectures=["Qwen2ForCausalLM"],
    bos_token_id=151643,
    eos_token_id=151645,
    hidden_act="silu",
    hidden_size=896,
    intermediate_size=4864,
    max_position_embeddings=32768,
    model_type="qwen2",
    num_attention_heads=14,
    num_hidden_layers=24,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    use_sliding_window=False,
    vocab_size=151936,
)
# Rehearsal shapes: small enough for a shared 2-core CPU, divisible by the quantization group (32).
TINY_PRESETS = {
    "tiny": dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=0,
        sliding_window=4096,
        use_sliding_window=False,
    ),
    "tiny-moe": dict(
        model_type="qwen2_moe",
        architectures=["Qwen2MoeForCausalLM"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=256,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=0,
        sliding_window=4096,
        use_sliding_window=False,
    ),
}
LOG_TAIL = 256 * 1024  # bytes of each step's log that come back in the bundle
OUT_FILE_LIMIT = 15 * 2**20  # $OUT takes files of at most 16 MiB


def rehearsal_default() -> bool:
    return os.environ.get("GPU_RUN_REHEARSAL", "").strip() not in ("", "0")


def log(msg: str) -> None:
    print(f"[gpu_run {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def env_list(name: str, default: str) -> list[int]:
    return [int(x) for x in (os.environ.get(name) or default).split(",") if x.strip()]


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


# --------------------------------------------------------------------------------------------------
# Steps


class Step:
    def __init__(
        self,
        name: str,
        group: str,
        argv,
        timeout: int,
        needs: tuple = (),
        env: dict | None = None,
        skip: str | None = None,
        meta: dict | None = None,
    ):
        self.name, self.group, self.argv, self.timeout = name, group, argv, timeout
        self.needs, self.env, self.skip, self.meta = needs, env or {}, skip, meta or {}


class Plan:
    """Every step of the run, in priority order, for the real run or the rehearsal."""

    def __init__(self, state: Path, rehearsal: bool):
        self.state, self.rehearsal = state, rehearsal
        self.results = state / "results"
        self.model = state / "model" / MODEL_NAME
        self.realcfg = state / "realcfg"
        self.gguf = state / "payloads" / "gguf"
        scale = float(os.environ.get("GPU_RUN_TIMEOUT_SCALE") or 1.0)
        self.t = lambda seconds: max(1, int(seconds * scale))
        if rehearsal:
            self.dtype = "float32"
            self.niah_lengths = env_list("NIAH_LENGTHS", "512,1024")
            self.passkey_lengths = env_list("PASSKEY_LENGTHS", "1024")
            self.dca = (env_int("DCA_CHUNK", 128), env_int("DCA_LOCAL", 16))
            self.yarn = (4.0, 128)
            self.prefill = env_int("PREFILL_STEP", 128)
            self.passkey_trials = 1
            self.presets = ["tiny", "tiny-moe"]
            self.long_chunks = [64]
            self.memory_lengths = "256"
        else:
            self.dtype = "bfloat16"
            self.niah_lengths = env_list("NIAH_LENGTHS", "16384,32768,65536,131072")
            self.passkey_lengths = env_list("PASSKEY_LENGTHS", "65536,131072")
            self.dca = (env_int("DCA_CHUNK", 32768), env_int("DCA_LOCAL", 4096))
            self.yarn = (4.0, 32768)
            self.prefill = env_int("PREFILL_STEP", 1024)
            self.passkey_trials = env_int("PASSKEY_TRIALS", 3)
            self.presets = ["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen2-57b-a14b-scaled"]
            self.long_chunks = [8192, 32768]  # 1, 2, 4 chunks: 8K/16K/32K and 32K/64K/128K
            self.memory_lengths = os.environ.get("MEMORY_LENGTHS") or "8192,32768,65536,131072"

    def methods(self) -> dict[str, list[str]]:
        chunk, local = self.dca
        f, orig = self.yarn
        return {
            "dca": ["--dca-chunk-size", str(chunk), "--dca-local-size", str(local)],
            "plain": [],
            "yarn": ["--yarn-factor", str(f), "--yarn-original-max-position-embeddings", str(orig)],
        }

    def steps(self) -> list[Step]:
        r, py = self.results, PY
        steps: list[Step] = []
        # (a) the suite on the device, float32 matmuls at full precision as tests/conftest.py sets.
        tests = ["tests/test_config.py"] if self.rehearsal else ["tests"]
        steps.append(
            Step(
                "tests",
                "tests",
                [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not real_model", *tests],
                self.t(480),
                env={"MLX_ENABLE_TF32": "0"},
            )
        )
        # (b) long context on the real model: NIAH per (method, length), one resumable file per method;
        # then the grid of each method (all cells already done: only draws), then passkey.
        common = ["--model", str(self.model), "--dtype", self.dtype, "--prefill-step-size", str(self.prefill)]
        niah_timeout = {16384: 120, 32768: 150, 65536: 240, 131072: 420}
        for m, flags in self.methods().items():
            for L in self.niah_lengths:
                steps.append(
                    Step(
                        f"niah-{m}-{_k(L)}",
                        "niah",
                        [
                            py,
                            "-m",
                            "qwen2_mlx.eval",
                            "niah",
                            *common,
                            *flags,
                            "--lengths",
                            str(L),
                            "--depths",
                            "0,25,50,75,100",
                            "--results",
                            str(r / f"niah-{m}.jsonl"),
                            "--out",
                            str(r / "parts" / f"niah-{m}-{L}.png"),
                            "--json",
                            str(r / "parts" / f"niah-{m}-{L}.json"),
                        ],
                        self.t(niah_timeout.get(L, 60)),
                        needs=("model",),
                        meta={"method": m, "length": L},
                    )
                )
        for m, flags in self.methods().items():
            steps.append(
                Step(
                    f"niah-{m}-grid",
                    "niah-grid",
                    lambda m=m, flags=flags: [
                        py,
                        "-m",
                        "qwen2_mlx.eval",
                        "niah",
                        *common,
                        *flags,
                        "--lengths",
                        ",".join(str(L) for L in self._finished_lengths(m)),
                        "--depths",
                        "0,25,50,75,100",
                        "--results",
                        str(r / f"niah-{m}.jsonl"),
                        "--out",
                        str(r / f"niah-{m}.png"),
                        "--json",
                        str(r / f"niah-{m}-grid.json"),
                    ],
                    self.t(120),
                    needs=("model",),
                    meta={"method": m},
                )
            )
        for m, flags in self.methods().items():
            for L in self.passkey_lengths:
                steps.append(
                    Step(
                        f"passkey-{m}-{_k(L)}",
                        "passkey",
                        [
                            py,
                            "-m",
                            "qwen2_mlx.eval",
                            "passkey",
                            *common,
                            *flags,
                            "--length",
                            str(L),
                            "--trials",
                            str(self.passkey_trials),
                            "--results",
                            str(r / f"passkey-{m}-{L}.jsonl"),
                            "--json",
                            str(r / f"passkey-{m}-{L}.json"),
                        ],
                        self.t(240 if L > 65536 else 120),
                        needs=("model",),
                        meta={"method": m, "length": L},
                    )
                )
        # (c) speed against mlx-lm on random weights of real shapes, bfloat16 then 4-bit.
        if self.rehearsal:
            size = ["--prompt-tokens", "16", "--gen-tokens", "8", "--runs", "1"]
        for bits in (None, 4):
            for p in self.presets:
                if not self.rehearsal:
                    big = p == "qwen2-7b" or p.startswith("qwen2-57b")
                    size = [
                        "--prompt-tokens",
                        "128",
                        "--gen-tokens",
                        "128" if big else "256",
                        "--runs",
                        "3" if big else "5",
                    ]
                tag = f"{bits}bit" if bits else self.dtype.replace("bfloat16", "bf16")
                argv = [
                    py,
                    str(ROOT / "scripts" / "gpu_run.py"),
                    "bench",
                    "--random",
                    p,
                    "--random-dir",
                    str(self.state / "random"),
                    "--dtype",
                    self.dtype,
                    "--compare-mlx-lm",
                    *size,
                    "--json",
                    str(r / f"bench-{p}-{tag}.json"),
                ]
                if bits:
                    argv += ["--quantize-bits", str(bits)] + (["--q-group-size", "32"] if self.rehearsal else [])
                timeout = {"qwen2-7b": 300}.get(p, 180) + (120 if bits else 0)
                steps.append(Step(f"bench-{p}-{tag}", "bench", argv, self.t(timeout), meta={"preset": p, "tag": tag}))
        # (d) DCA against plain at 1, 2 and 4 chunks (random weights of the real model's shapes, bfloat16
        # as the model runs on a GPU; float32 in the rehearsal), then peak memory of a long prefill.
        for i, c in enumerate(self.long_chunks):
            local = max(1, c // 8)
            mem = self.memory_lengths if i == len(self.long_chunks) - 1 else ""
            steps.append(
                Step(
                    f"long-{_k(c)}",
                    "long",
                    [
                        py,
                        "-m",
                        "qwen2_mlx.bench.long",
                        "--random-weights",
                        "--model",
                        str(self.realcfg),
                        "--chunk-size",
                        str(c),
                        "--local-size",
                        str(local),
                        "--dtype",
                        "float32" if self.rehearsal else "bfloat16",
                        "--json",
                        str(r / f"long-{_k(c)}.json"),
                        "--decode-tokens",
                        "8" if self.rehearsal else "32",
                        "--prefill-step-size",
                        str(self.prefill),
                        "--memory-lengths",
                        mem,
                        "--memory-chunk-size",
                        str(self.dca[0]),
                        "--memory-local-size",
                        str(self.dca[1]),
                    ],
                    self.t(240 if c <= 8192 else 420),
                    meta={"chunk": c},
                )
            )
        # (e) the real-model tests on the device, once the GGUF is there (QWEN2_MLX_CACHE holds it).
        steps.append(
            Step(
                "tests-real",
                "tests",
                [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "real_model", "tests"],
                self.t(420),
                needs=("gguf",),
                env={"MLX_ENABLE_TF32": "0", "QWEN2_MLX_CACHE": str(self.state / "cache")},
                skip="rehearsal: the real GGUF is not used" if self.rehearsal else None,
            )
        )
        steps.sort(key=self.priority)
        only = [s for s in (os.environ.get("GPU_RUN_ONLY") or "").split(",") if s]
        drop = [s for s in (os.environ.get("GPU_RUN_SKIP") or "").split(",") if s]
        if only:
            steps = [s for s in steps if any(s.name.startswith(o) for o in only)]
        return [s for s in steps if not any(s.name.startswith(d) for d in drop)]

    def priority(self, step: Step) -> tuple:
        """The order of the run: what the issue's goals need first, the rest after (a stable sort keeps
        the listed order within a rank). Steps that need the model wait for it; lower ranks run meanwhile."""
        long_L = self.niah_lengths[2:] or self.niah_lengths[-1:]  # past the trained window: 64K, 128K
        n, m = step.name, step.meta
        big = ("qwen2-7b", "qwen2-57b-a14b-scaled", "tiny-moe")
        if n == "tests":
            return (0,)
        if step.group == "niah" and m["method"] == "dca":
            return (1,)
        if step.group == "bench" and m["preset"] not in big and m["tag"] != "4bit":
            return (2,)
        if step.group == "long" and m["chunk"] == self.long_chunks[-1]:
            return (3,)
        if step.group == "niah" and m["length"] in long_L:
            return (4,)
        if step.group == "passkey" and m["method"] == "dca":
            return (5,)
        if step.group in ("niah", "niah-grid"):
            return (6,)
        if step.group in ("bench", "long"):
            return (7,)
        return (8,)

    def _finished_lengths(self, method: str) -> list[int]:
        done = read_steps(self.results)
        ok = [L for L in self.niah_lengths if done.get(f"niah-{method}-{_k(L)}", {}).get("status") == "ok"]
        return ok or self.niah_lengths[:1]

    def ready(self, need: str) -> bool:
        if need == "model":
            return (self.model / "config.json").exists()
        if need == "gguf":
            return (self.state / "cache" / GGUF_NAME).exists()
        return True


def read_steps(results: Path) -> dict[str, dict]:
    """Finished steps from RESULTS/steps.jsonl (a torn last line, from a kill mid-write, is ignored)."""
    done = {}
    path = results / "steps.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                done[rec["step"]] = rec
    return done


def append_step(results: Path, rec: dict) -> None:
    path = results / "steps.jsonl"
    data = path.read_bytes() if path.exists() else b""
    with open(path, "a", encoding="utf-8") as f:
        if data and not data.endswith(b"\n"):
            f.write("\n")  # after a torn line
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# What each step's output says


def parse_step(step: Step, log_text: str, results: Path) -> dict:
    try:
        return _parse(step, log_text, results)
    except Exception as e:  # a summary must never lose the step's record
        return {"parse_error": repr(e)}


def _parse(step: Step, text: str, r: Path) -> dict:
    if step.group == "tests":
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|deselected)", text)}
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
        return {"counts": counts, "failed": failed[:40]}
    if step.group == "niah":
        g = json.loads((r / "parts" / f"niah-{step.meta['method']}-{step.meta['length']}.json").read_text())
        return {"length": step.meta["length"], "found": [row[0] for row in g["scores"]], "accuracy": g["accuracy"]}
    if step.group == "niah-grid":
        g = json.loads((r / f"niah-{step.meta['method']}-grid.json").read_text())
        return {
            "lengths": g["lengths"],
            "depths": g["depths"],
            "scores": g["scores"],
            "accuracy": g["accuracy"],
            "heatmap": f"niah-{step.meta['method']}.png",
        }
    if step.group == "passkey":
        name = f"passkey-{step.meta['method']}-{step.meta['length']}.json"
        return {"length": step.meta["length"], "accuracy": json.loads((r / name).read_text())["accuracy"]}
    if step.group == "bench":
        res = json.loads((r / f"bench-{step.meta['preset']}-{step.meta['tag']}.json").read_text())
        out = {
            "median": res["median"],
            "ratio": res.get("ratio_ours_over_mlx_lm"),
            "paired": res.get("paired_ratio_median"),
            "greedy_match": res.get("greedy_tokens_match_mlx_lm"),
            "first_difference": res.get("first_token_difference"),
            "roofline_tps": res["roofline"]["roofline_decode_tps"],
            "versions": res.get("versions"),
            "device": res["machine"].get("device"),
            "device_info": res["machine"].get("device_info"),
        }
        return out
    if step.group == "long":
        rows = []
        for m in re.finditer(
            r"^\s*(\d+) \|\s+([\d.]+)/s\s+([\d.]+)/s\s+([\d.]+) \|\s+([\d.]+)/s\s+([\d.]+)/s\s+([\d.]+)\s*$",
            text,
            flags=re.M,
        ):
            L, dp, dd, dr, pp, pd, pr = m.groups()
            rows.append(
                {
                    "context": int(L),
                    "decode_plain": float(dp),
                    "decode_dca": float(dd),
                    "decode_ratio": float(dr),
                    "prefill_plain": float(pp),
                    "prefill_dca": float(pd),
                    "prefill_ratio": float(pr),
                }
            )
        memory = [
            {"tokens": int(a), "plain_mb": float(b), "dca_mb": float(c), "kv_mb": float(d)}
            for a, b, c, d in re.findall(r"^\s*(\d+) \|\s+(\d+)\s+(\d+) \|\s+(\d+)\s*$", text, flags=re.M)
        ]
        return {"rows": rows, "memory": memory}
    return {}


# --------------------------------------------------------------------------------------------------
# The driver


def run_step(step: Step, plan: Plan, deadline: float | None) -> dict | None:
    """Run one step under its timeout; None when the run's own deadline cut it (not recorded: redo later)."""
    logs = plan.results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (plan.results / "parts").mkdir(exist_ok=True)
    started = time.time()
    rec = {
        "step": step.name,
        "group": step.group,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "timeout_s": step.timeout,
        "log": f"logs/{step.name}.log",
    }
    if step.skip:
        return {**rec, "status": "skipped", "why": step.skip, "seconds": 0.0}
    argv = step.argv() if callable(step.argv) else step.argv
    rec["argv"] = [str(a) for a in argv]
    timeout = step.timeout
    cut_by_deadline = False
    if deadline is not None and deadline - started < timeout:
        timeout, cut_by_deadline = max(1.0, deadline - started), True
    env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1"}
    log_path = logs / f"{step.name}.log"
    with open(log_path, "ab") as out:
        out.write(f"\n=== {rec['started']} {' '.join(rec['argv'])}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group, started above
            proc.wait()
            rc, status = None, "timeout"
            if cut_by_deadline:
                log(f"{step.name}: stopped at the run's deadline; not recorded, it runs again next time")
                return None
    rec.update(status=status, rc=rc, seconds=round(time.time() - started, 1))
    text = log_path.read_text(encoding="utf-8", errors="replace")[-200_000:]
    if status == "ok" or step.group == "tests":
        rec["summary"] = parse_step(step, text, plan.results)
    if status != "ok":
        rec["tail"] = text[-1500:]
    return rec


def drive(args) -> int:
    state = Path(args.state)
    plan = Plan(state, args.rehearsal)
    plan.results.mkdir(parents=True, exist_ok=True)
    lock = open(state / "driver.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log("another driver is running on this state folder; leaving it to that one")
        return 0
    (state / "driver.pid").write_text(str(os.getpid()))
    if not (plan.realcfg / "config.json").exists():
        plan.realcfg.mkdir(parents=True, exist_ok=True)
        cfg = REAL_CONFIG if not args.rehearsal else dict(TINY_PRESETS["tiny"], torch_dtype="float32")
        (plan.realcfg / "config.json").write_text(json.dumps(cfg, indent=2))
    deadline = time.time() + args.budget if args.budget else None
    waited = 0.0
    while True:
        done = read_steps(plan.results)
        pending = [s for s in plan.steps() if s.name not in done]
        if not pending:
            break
        runnable = [s for s in pending if s.skip or all(plan.ready(n) for n in s.needs)]
        if deadline is not None and time.time() >= deadline:
            log(f"the run's budget is spent; {len(pending)} steps left for the next run")
            break
        if not runnable:
            missing = sorted({n for s in pending for n in s.needs if not plan.ready(n)})
            if waited >= args.wait_for_inputs:
                log(f"{len(pending)} steps wait for {', '.join(missing)}, which did not arrive; stopping")
                break
            if waited == 0:
                log(f"{len(pending)} steps wait for {', '.join(missing)}")
            time.sleep(2)
            waited += 2
            continue
        waited = 0.0
        step = runnable[0]
        log(f"{step.name}: start (timeout {step.timeout}s)")
        rec = run_step(step, plan, deadline)
        if rec is None:
            break
        append_step(plan.results, rec)
        log(f"{step.name}: {rec['status']} in {rec['seconds']}s")
    text = summarize(plan)
    (plan.results / "summary.txt").write_text(text)
    print(text, flush=True)
    return 0


# --------------------------------------------------------------------------------------------------
# The summary


def summarize(plan: Plan) -> str:
    done = read_steps(plan.results)
    steps = plan.steps()
    lines = [
        f"== issue 16 GPU run{' (REHEARSAL: tiny models on the CPU)' if plan.rehearsal else ''}: "
        f"{sum(s.name in done for s in steps)}/{len(steps)} steps finished",
        f"commit: {git_commit()}  state: {plan.state}",
    ]
    dev = next(
        (
            r["summary"].get("device_info")
            for r in done.values()
            if r.get("group") == "bench" and r.get("summary", {}).get("device_info")
        ),
        None,
    )
    ver = next(
        (
            r["summary"].get("versions")
            for r in done.values()
            if r.get("group") == "bench" and r.get("summary", {}).get("versions")
        ),
        None,
    )
    if dev or ver:
        lines.append(f"device: {dev}  versions: {ver}")
    lines.append("")
    lines.append(f"{'step':34s} {'status':8s} {'s':>7s}  figures")
    for s in steps:
        r = done.get(s.name)
        if r is None:
            lines.append(f"{s.name:34s} {'pending':8s} {'':>7s}  (needs {', '.join(s.needs) or 'a run'})")
            continue
        lines.append(f"{s.name:34s} {r['status']:8s} {r.get('seconds', 0):7.1f}  {figures(r)}")
    lines.append("")
    lines += goals(plan, done)
    return "\n".join(lines) + "\n"


def figures(r: dict) -> str:
    s = r.get("summary") or {}
    g = r.get("group")
    if r["status"] == "skipped":
        return r.get("why", "")
    if g == "tests":
        c = s.get("counts", {})
        txt = ", ".join(f"{v} {k}" for k, v in c.items())
        return txt + (f"; first failures: {' '.join(s['failed'][:3])}" if s.get("failed") else "")
    if r["status"] != "ok":
        return (r.get("tail") or "").strip().splitlines()[-1][:100] if r.get("tail") else ""
    if g == "niah":
        return f"found {sum(x > 0.5 for x in s['found'])}/{len(s['found'])} depths at {_k(s['length'])}"
    if g == "niah-grid":
        cells = [x for row in s["scores"] for x in row]
        per = " ".join(
            f"{_k(L)}:{sum(row[i] for row in s['scores']) / len(s['scores']):.0%}" for i, L in enumerate(s["lengths"])
        )
        return f"{sum(cells) / len(cells):.0%} of cells ({per}); {s['heatmap']}"
    if g == "passkey":
        return f"accuracy {s['accuracy']:.2f} at {_k(s['length'])}"
    if g == "bench":
        m, ratio = s["median"], s.get("ratio") or {}
        o, t = m.get("qwen2_mlx", {}), m.get("mlx_lm", {})
        paired = (s.get("paired") or {}).get("decode_tps", 0)
        greedy = "same" if s.get("greedy_match") else f"differs@{s.get('first_difference')}"
        return (
            f"decode {o.get('decode_tps', 0):.1f}/{t.get('decode_tps', 0):.1f} tok/s = "
            f"{ratio.get('decode_tps', 0):.2f}x (paired {paired:.2f}x), prefill {ratio.get('prefill_tps', 0):.2f}x, "
            f"peak {o.get('peak_memory_gb', 0):.2f} GB, greedy {greedy}"
        )
    if g == "long":
        rows = "; ".join(
            f"{_k(x['context'])}: decode {x['decode_ratio']:.2f}x prefill {x['prefill_ratio']:.2f}x" for x in s["rows"]
        )
        mem = "; ".join(f"{_k(x['tokens'])}: {x['plain_mb']:.0f}/{x['dca_mb']:.0f} MB" for x in s["memory"])
        return f"DCA/plain {rows}" + (f" | peak plain/DCA {mem}" if mem else "")
    return ""


def goals(plan: Plan, done: dict) -> list[str]:
    out = ["goals (issue 16):"]
    t = done.get("tests")
    if t:
        c = t.get("summary", {}).get("counts", {})
        green = t["status"] == "ok" and not c.get("failed") and not c.get("error") and not c.get("errors")
        out.append(
            f"  suite green on the device: {'yes' if green else 'NO'} ({', '.join(f'{v} {k}' for k, v in c.items())})"
        )
    for m in ("dca", "yarn", "plain"):
        g = done.get(f"niah-{m}-grid")
        if g and g["status"] == "ok":
            s = g["summary"]
            cells = [x for row in s["scores"] for x in row]
            frac = sum(cells) / len(cells)
            need = " (goal >= 90 %)" if m != "plain" else " (expected to fail past 32K)"
            out.append(f"  NIAH {m}: {frac:.0%} of cells up to {_k(max(s['lengths']))}{need}")
    for r in done.values():
        if r.get("group") == "long" and r["status"] == "ok":
            for x in r["summary"]["rows"]:
                if x["context"] == (65536 if not plan.rehearsal else 2 * plan.long_chunks[-1]):
                    out.append(f"  DCA decode at {_k(x['context'])}: {x['decode_ratio']:.2f}x plain (goal >= 0.8x)")
    for p in plan.presets[:2]:
        r = done.get(f"bench-{p}-{plan.dtype.replace('bfloat16', 'bf16')}")
        if r and r["status"] == "ok" and r["summary"].get("ratio"):
            out.append(f"  decode {p} {plan.dtype}: {r['summary']['ratio']['decode_tps']:.2f}x mlx-lm (goal >= 1.25x)")
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha or "unknown") + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        env = os.environ.get("GPU_RUN_COMMIT")
        return env or "unknown (no git here; prepare writes it into the manifest)"


# --------------------------------------------------------------------------------------------------
# prepare (here): cut the payloads into per-call folders


def prepare(args) -> int:
    carry = Path(args.carry_dir)
    payloads = []
    for spec in args.payload:
        name, _, path = spec.partition("=")
        payloads.append((name, Path(path)))
    for old in carry.glob("call-*"):
        shutil.rmtree(old)
    tree = tree_bytes()
    budget = args.call_bytes or (args.limit_bytes - tree - args.margin_bytes)
    log(f"the working tree that travels with every call: {tree} bytes; pieces per call: at most {budget} bytes")
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "call_bytes": budget,
        "payloads": [],
        "commit": git_commit(),
    }
    call, room = 1, budget
    for name, path in payloads:
        size = path.stat().st_size
        entry = {"name": name, "file": path.name, "size": size, "sha256": sha256_of(path), "pieces": []}
        with open(path, "rb") as src:
            pos, idx = 0, 0
            while pos < size:
                if room <= 0:
                    call, room = call + 1, budget
                n = min(room, size - pos)
                dest = carry / f"call-{call}" / f"{name}.{idx:03d}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as out:
                    left = n
                    while left:
                        block = src.read(min(left, 1 << 22))
                        out.write(block)
                        left -= len(block)
                entry["pieces"].append({"file": dest.name, "call": call, "size": n})
                pos, idx, room = pos + n, idx + 1, room - n
        manifest["payloads"].append(entry)
    manifest["calls"] = call
    for k in range(1, call + 1):
        (carry / f"call-{k}").mkdir(parents=True, exist_ok=True)
        (carry / f"call-{k}" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    per_call = {k: sum(f.stat().st_size for f in (carry / f"call-{k}").iterdir()) for k in range(1, call + 1)}
    print_calls(manifest, per_call, tree, carry)
    return 0


def tree_bytes() -> int:
    """Bytes of what travels with every call besides `carry`: tracked and untracked-not-ignored files."""
    try:
        names = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.split(b"\0")
    except (OSError, subprocess.SubprocessError):
        return 0
    total = 0
    for n in names:
        f = ROOT / os.fsdecode(n)
        if n and f.is_file():
            total += f.stat().st_size
    return total


def print_calls(manifest: dict, per_call: dict, tree: int, carry: Path) -> None:
    """The `run` calls to make on the device machine, in order (docs/gpu-run.md explains the waits)."""
    rel = os.path.relpath(carry, ROOT)
    ready_at = {p["name"]: max(x["call"] for x in p["pieces"]) for p in manifest["payloads"]}
    n = manifest["calls"]
    print(
        f"# {n} calls carry {sum(per_call.values()) / 2**20:.1f} MiB "
        f"(+ {tree / 2**20:.1f} MiB of working tree each); make them back to back (the machine is given back "
        f"30 s after a call returns)"
    )
    for k in range(1, n + 1):
        last = k == n
        wait = 420 if last else 0
        what = ", ".join(
            f"{p['name']} {sum(1 for x in p['pieces'] if x['call'] <= k)}/{len(p['pieces'])}"
            for p in manifest["payloads"]
        )
        note = []
        for name, at in ready_at.items():
            if at == k:
                note.append(
                    {"site": "wheels unpacked, the driver starts", "gguf": "model converted, NIAH starts"}.get(
                        name, name
                    )
                )
        cmd = f"bash scripts/gpu_run.sh --wait {wait}"
        carry_list = [f"{rel}/call-{k}"] + ([f"{rel}/results"] if k == 1 and (carry / "results").is_dir() else [])
        print(
            json.dumps(
                {
                    "call": k,
                    "command": cmd,
                    "carry": carry_list,
                    "timeout_s": 560 if last else 180,
                    "carry_mib": round((per_call[k] + tree) / 2**20, 1),
                    "after": f"{what}" + (f"; {'; '.join(note)}" if note else ""),
                }
            )
        )
    print(
        json.dumps(
            {
                "call": n + 1,
                "command": "bash scripts/gpu_run.sh --wait 300",
                "carry": [],
                "timeout_s": 360,
                "after": "only if device time is left: the driver continues; then give_back",
            }
        )
    )


# --------------------------------------------------------------------------------------------------
# device (there): stage, unpack, convert, start the driver, wait, collect


def stage(carry: Path, state: Path) -> dict:
    """Move this call's pieces into STATE/parts; assemble each payload whose pieces are all there."""
    parts = state / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    manifest = None
    for d in sorted(carry.glob("call-*")):
        if (d / "manifest.json").exists():
            manifest = json.loads((d / "manifest.json").read_text())
            shutil.copy(d / "manifest.json", state / "manifest.json")
        for f in d.iterdir():
            if f.name != "manifest.json" and not (parts / f.name).exists():
                shutil.copy(f, parts / (f.name + ".tmp"))
                os.replace(parts / (f.name + ".tmp"), parts / f.name)
    if manifest is None and (state / "manifest.json").exists():
        manifest = json.loads((state / "manifest.json").read_text())
    # Results of an earlier lease, carried back as .carry/results: seed this run with them.
    seed = carry / "results"
    res = state / "results"
    if seed.is_dir() and not (res / "steps.jsonl").exists():
        shutil.copytree(seed, res, dirs_exist_ok=True)
        log(f"seeded the results with {seed} ({len(read_steps(res))} steps done earlier)")
    status = {}
    if manifest is None:
        return status
    os.environ.setdefault("GPU_RUN_COMMIT", manifest.get("commit", ""))
    payloads = state / "payloads"
    payloads.mkdir(exist_ok=True)
    for p in manifest["payloads"]:
        have = [
            x for x in p["pieces"] if (parts / x["file"]).exists() and (parts / x["file"]).stat().st_size == x["size"]
        ]
        status[p["name"]] = f"{len(have)}/{len(p['pieces'])} pieces"
        out = payloads / p["name"]
        if len(have) < len(p["pieces"]) or (state / f"{p['name']}.ok").exists():
            if (state / f"{p['name']}.ok").exists():
                status[p["name"]] = "ready"
            continue
        if not out.exists() or out.stat().st_size != p["size"]:
            with open(out.with_suffix(".tmp"), "wb") as dst:
                for x in p["pieces"]:
                    with open(parts / x["file"], "rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
            os.replace(out.with_suffix(".tmp"), out)
        if sha256_of(out) != p["sha256"]:
            status[p["name"]] = "CHECKSUM MISMATCH"
            log(f"{p['name']}: checksum mismatch after assembly; pieces removed, carry them again")
            for x in p["pieces"]:
                (parts / x["file"]).unlink(missing_ok=True)
            out.unlink()
            continue
        t0 = time.time()
        if p["name"] == "site":
            tmp = state / "site.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            subprocess.run(["tar", "-xJf", str(out), "-C", str(tmp)], check=True)
            shutil.rmtree(state / "site", ignore_errors=True)
            os.replace(tmp, state / "site")
        elif p["name"] == "gguf":
            cache = state / "cache"
            cache.mkdir(exist_ok=True)
            if not (cache / GGUF_NAME).exists():
                os.link(out, cache / GGUF_NAME)
            model = state / "model" / MODEL_NAME
            if not (model / "config.json").exists():
                model.parent.mkdir(exist_ok=True)
                dtype = "float32" if rehearsal_default() else "bfloat16"
                subprocess.run(
                    [
                        PY,
                        str(ROOT / "convert.py"),
                        "--gguf",
                        str(out),
                        "--mlx-path",
                        str(model),
                        "--dtype",
                        dtype,
                        "--force",
                    ],
                    check=True,
                    cwd=ROOT,
                    env=device_env(state),
                )
        (state / f"{p['name']}.ok").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        status[p["name"]] = f"ready ({time.time() - t0:.0f}s to unpack)"
    return status


def device_env(state: Path) -> dict:
    """The environment of every process there: the carried packages first, CUDA libraries of PyTorch's wheels."""
    env = dict(os.environ)
    site = state / "site"
    if site.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(
            [str(site), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        try:
            import importlib.util

            spec = importlib.util.find_spec("nvidia")
            roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
        except (ImportError, ValueError):
            roots = []
        libs = [str(p) for r in roots for p in sorted(Path(r).glob("*/lib"))]
        if libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                libs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
            )
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def driver_running(state: Path) -> bool:
    lock_path = state / "driver.lock"
    if not lock_path.exists():
        return False
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def device(args) -> int:
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or os.environ.get("OUT") or state / "out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    status = stage(Path(args.carry_dir), state)
    log(f"staged: {status or 'no manifest carried yet'}")
    need_site = not args.rehearsal
    started = False
    if (not need_site or (state / "site.ok").exists()) and not driver_running(state):
        env = device_env(state)
        if need_site and not args.skip_check:
            chk = subprocess.run(
                [
                    PY,
                    "-c",
                    "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), "
                    "'cuda' if mx.cuda.is_available() else 'NO CUDA')",
                ],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            log(f"device check: {(chk.stdout + chk.stderr).strip()[-400:]}")
            (state / "results").mkdir(parents=True, exist_ok=True)
            (state / "results" / "device.txt").write_text(chk.stdout + chk.stderr + nvidia_smi())
        cmd = (
            [
                PY,
                str(Path(__file__).resolve()),
                "drive",
                "--state",
                str(state),
                "--wait-for-inputs",
                str(args.wait_for_inputs),
            ]
            + (["--rehearsal"] if args.rehearsal else [])
            + (["--budget", str(args.budget)] if args.budget else [])
        )
        with open(state / "driver.log", "ab") as lg:
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=lg,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        started = True
        log("driver started in the background (setsid); its log: driver.log")
        time.sleep(2)
    if args.wait:
        end = t0 + args.wait
        while time.time() < end and (driver_running(state) or started and time.time() < t0 + 5):
            time.sleep(3)
    collect(state, out, args.rehearsal)
    print(summarize(Plan(state, args.rehearsal)), flush=True)
    print(f"staged: {status}; driver {'running' if driver_running(state) else 'not running'}", flush=True)
    return 0


def nvidia_smi() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "(no nvidia-smi)\n"


def collect(state: Path, out: Path, rehearsal: bool) -> None:
    """$OUT gets summary.txt, steps.jsonl and results.tar.gz (every results file, logs cut to their tails)."""
    res = state / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "summary.txt").write_text(summarize(Plan(state, rehearsal)))
    for name in ("summary.txt", "steps.jsonl"):
        if (res / name).exists():
            shutil.copy(res / name, out / name)
    tmp = out / "results.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for f in sorted(res.rglob("*")):
            if not f.is_file() or f.suffix == ".tmp":
                continue
            arc = f"results/{f.relative_to(res)}"
            if f.suffix == ".log" and f.stat().st_size > LOG_TAIL:
                data = f.read_bytes()[-LOG_TAIL:]
                info = tarfile.TarInfo(arc)
                info.size = len(data)
                import io

                tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(f, arc)
        dl = state / "driver.log"
        if dl.exists():
            data = dl.read_bytes()[-LOG_TAIL:]
            info = tarfile.TarInfo("results/driver.log")
            info.size = len(data)
            import io

            tar.addfile(info, io.BytesIO(data))
    if tmp.stat().st_size > OUT_FILE_LIMIT:
        log(f"results.tar.gz is {tmp.stat().st_size} bytes, over $OUT's limit; leaving out the heatmap parts")
    os.replace(tmp, out / "results.tar.gz")


# --------------------------------------------------------------------------------------------------
# bench: qwen2_mlx.bench with the tiny presets and an optional quantized copy of the random folder


def bench(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gpu_run.py bench", add_help=False)
    ap.add_argument("--quantize-bits", type=int)
    ap.add_argument("--q-group-size", type=int, default=64)
    ap.add_argument("--random")
    ap.add_argument("--random-dir")
    ap.add_argument("--dtype", default="bfloat16")
    known, rest = ap.parse_known_args(argv)
    from qwen2_mlx.bench import compare, random_model

    random_model.PRESETS.update(TINY_PRESETS)
    if not known.quantize_bits:
        return compare.main(["--random", known.random, "--random-dir", known.random_dir, "--dtype", known.dtype, *rest])
    import mlx.core as mx

    base = Path(known.random_dir)
    src = random_model.write_random_model(
        known.random, base / f"{known.random}-{known.dtype}", getattr(mx, known.dtype)
    )
    dst = base / f"{known.random}-{known.quantize_bits}bit"
    if not (dst / "config.json").exists():
        from qwen2_mlx.convert import cli

        rc = cli.run(
            [
                "--hf-path",
                str(src),
                "--mlx-path",
                str(dst),
                "-q",
                "--q-bits",
                str(known.quantize_bits),
                "--q-group-size",
                str(known.q_group_size),
                "--force",
            ]
        )
        if rc:
            return rc
    return compare.main(["--model", str(dst), *rest])


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    ap = argparse.ArgumentParser(prog="gpu_run.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    default_state = os.environ.get("GPU_RUN_DIR") or "/tmp/qwen2-gpu"
    for name in ("device", "drive", "summary"):
        p = sub.add_parser(name)
        p.add_argument("--state", default=default_state, help="state folder (parts, site, model, results)")
        p.add_argument("--rehearsal", action="store_true", default=rehearsal_default())
        if name in ("device", "drive"):
            p.add_argument(
                "--wait-for-inputs",
                type=float,
                default=float(os.environ.get("GPU_RUN_INPUT_WAIT") or 900),
                help="seconds the driver waits for the model when only steps needing it are left",
            )
            p.add_argument(
                "--budget",
                type=float,
                default=float(os.environ.get("GPU_RUN_BUDGET") or 0),
                help="stop starting steps after this many seconds (0: no limit)",
            )
        if name == "device":
            p.add_argument("--carry-dir", default=str(ROOT / ".carry"))
            p.add_argument("--out", default=None)
            p.add_argument(
                "--wait",
                type=float,
                default=float(os.environ.get("WAIT") or 0),
                help="seconds to wait for the driver before collecting (it stops waiting when done)",
            )
            p.add_argument("--skip-check", action="store_true")
    p = sub.add_parser("prepare")
    p.add_argument("--carry-dir", default=str(ROOT / ".carry"))
    p.add_argument("--call-bytes", type=int, default=0, help="bytes of pieces per call (default: from --limit-bytes)")
    p.add_argument("--limit-bytes", type=int, default=64 * 2**20, help="what may travel in one call (64 MiB)")
    p.add_argument("--margin-bytes", type=int, default=2 * 2**20, help="room left for files that appear later")
    p.add_argument("--payload", action="append", default=[], help="NAME=FILE, in carrying order")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        return prepare(a)
    if a.cmd == "device":
        return device(a)
    if a.cmd == "drive":
        return drive(a)
    plan = Plan(Path(a.state), a.rehearsal)
    text = summarize(plan)
    plan.results.mkdir(parents=True, exist_ok=True)
    (plan.results / "summary.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
