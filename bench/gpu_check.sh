#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the `device` tool; never CI).  The device image has CUDA torch,
# transformers, accelerate, safetensors and triton but no network, so signround runs from src/ and gptqmodel is
# used only if it was carried as wheels (.whl, see /work/.library/device/README.md).  Results go to $OUT.
#   device run: bash bench/gpu_check.sh        (timeout_s 540 leaves room for one rerun in a 15-minute budget)
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    | tee -a "$OUT/device.txt"
# CUDA suites: our Triton kernel compiled for the GPU, GPTQModel's kernels when gptqmodel imports
timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_triton.py tests/test_kernels_gptqmodel.py \
    tests/test_kernel_select.py tests/test_kernel_matrix.py 2>&1 | tee "$OUT/pytest.txt"
timeout 200 python3 bench/gpu_kernels.py 2>&1 | tee "$OUT/gpu_kernels.txt"
