#!/usr/bin/env bash
# Run the test suite and the benchmark against mlx-lm on an NVIDIA machine with mlx[cuda13].
# The machine needs no network: WHEELS names a folder with the mlx, mlx-cuda-13, mlx-lm, gguf,
# textual (+ mdit-py-plugins, linkify-it-py, uc-micro-py, platformdirs) and pytest-textual-snapshot
# wheels; torch, transformers, tokenizers, safetensors and jinja2 are expected to be installed.
# Usage: WHEELS=/path/to/wheels OUT=/path/to/results bash scripts/gpu_check.sh
# Superseded for issue 16 by scripts/gpu_run.sh (docs/gpu-run.md); kept for a quick check by hand.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl || exit 1
# mlx-cuda finds the CUDA libraries of the nvidia-* wheels that PyTorch installed.
NV=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])" 2>/dev/null)
if [ -n "$NV" ]; then
  LIBS=$(find "$NV" -mindepth 2 -maxdepth 2 -type d -name lib | tr '\n' ':')
  export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:-}"
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.cuda.is_available())" \
  2>&1 | tee -a "$OUT/device.txt"
# shellcheck disable=SC2086  # PYTEST_ARGS is meant to split into words
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m "not real_model" \
  ${PYTEST_ARGS:-} tests > "$OUT/pytest.log" 2>&1
echo "pytest exit: $?"; grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
for preset in ${PRESETS:-qwen2-0.5b qwen2-1.5b}; do
  timeout "${BENCH_TIMEOUT:-150}" python3 -m qwen2_mlx.bench --random "$preset" --compare-mlx-lm \
    --json "$OUT/bench-$preset.json" > "$OUT/bench-$preset.log" 2>&1
  echo "bench $preset exit: $?"; tail -22 "$OUT/bench-$preset.log"
done
