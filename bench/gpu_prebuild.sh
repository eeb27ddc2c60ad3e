#!/usr/bin/env bash
# Compiles GPTQModel's CUDA kernels (ExLlamaV2, Marlin fp16 / bf16) here, for the lent GPU machine, into
# .gpucache/prebuilt/; bench/gpu_check.sh installs them there so that a 15-minute loan is not spent compiling
# (see bench/gpu_prebuilt.py for why and how).  Needs nvcc 13.x here (CUDA_HOME) and makes its own venv with the
# device image's torch, 2.11.0+cu130 from PyPI: a one-time download of about 3 GB (torch and NVIDIA's libraries),
# kept apart from .venv, whose torch stays the pinned CPU build.  Minutes on 2 cores; never part of CI.
#   bash bench/gpu_prebuild.sh       then: device run "bash bench/gpu_check.sh" with carry [".whl", ".gpucache"]
# Run again, it keeps the libraries already built for the same torch, gptqmodel and arch (--force rebuilds).
set -euo pipefail
VENV="${GPU_BUILD_VENV:-$HOME/.cache/signround/gpubuild}"
PY312="${PY312:-python3.12}"  # the device's Python; a pyenv shim without that version selected does not run
"$PY312" -c "" 2>/dev/null || PY312=$(ls "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
[ -n "$PY312" ] || { echo "needs Python 3.12, the device's: set PY312" >&2; exit 1; }
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc under CUDA_HOME=$CUDA_HOME: set CUDA_HOME to a CUDA 13 toolkit" >&2; exit 1; }
[ -f .whl/gptqmodel-7.6.0-py3-none-any.whl ] || bash bench/gpu_wheels.sh
if [ ! -x "$VENV/bin/python" ]; then
    "$PY312" -m venv "$VENV"
    # the device image's torch and transformers; gptqmodel and its imports from .whl (as gpu_check.sh installs them)
    "$VENV/bin/pip" install -q torch==2.11.0 transformers==5.17.0 "accelerate>=1.13" safetensors packaging \
        threadpoolctl numpy==2.2.6 protobuf pillow requests pyarrow xxhash pandas tqdm httpx ninja
    "$VENV/bin/pip" install -q --no-deps .whl/*.whl .whl/pypcre-*.tar.gz
fi
"$VENV/bin/python" bench/gpu_prebuilt.py build .gpucache/prebuilt "$@" 2>&1 | tr '\r' '\n' | grep -v "Compiling extension"
# installed as on an H100 and loaded through GPTQModel's own loader, which must find them rather than compile
"$VENV/bin/python" bench/gpu_prebuilt.py check .gpucache/prebuilt 2>&1 | grep -E "^(exllamav2|marlin)|not installed"
du -sh .gpucache/prebuilt
