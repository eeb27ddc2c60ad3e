#!/usr/bin/env bash
# Tuning time of signround and auto-round 0.16.1 on a lent GPU (the `device` tool; never CI): bench/gpu_tune_pair.py.
# auto-round and the packages it imports that the device image lacks travel as wheels in .gpucache/tune/wheels
# (bash bench/gpu_tune.sh --fetch-wheels, here); signround runs from src/.  Each run is a fresh process; rows go
# to $OUT/tune_pairs.jsonl, logs to $OUT/tune_log.txt.  The most wanted pair comes first, and each step's timeout
# is cut to what is left of DEADLINE seconds, so a slow step cannot cost the rows before it.
#   here:    .venv/bin/python bench/gpu_tune_pair.py prepare --model-src ~/.cache/signround/models/smollm2-135m
#            bash bench/gpu_tune.sh --fetch-wheels
#   device:  bash bench/gpu_tune.sh        carry [".gpucache/tune"], timeout_s 510
set -uo pipefail
CARRY=.gpucache/tune
if [ "${1:-}" = "--fetch-wheels" ]; then  # here: wheels for the device's Python 3.12, no dependencies resolved
    rm -rf "$CARRY/wheels"; mkdir -p "$CARRY/wheels"
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$CARRY/wheels" auto-round==0.16.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
        pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2
    ls "$CARRY/wheels"; exit
fi
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_tune}"; mkdir -p "$OUT"
LOG="$OUT/tune_log.txt"; ROWS="$OUT/tune_pairs.jsonl"
start=$SECONDS; DEADLINE="${DEADLINE:-480}"
stamp() { echo "[$((SECONDS - start)) s] $*" | tee -a "$LOG"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc
  python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } 2>&1 | tee -a "$LOG"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-ref \
    "$CARRY"/wheels/*.whl 2>&1 | tail -3 | tee -a "$LOG"
stamp "reference wheels installed"
python3 bench/gpu_tune_pair.py build 2>&1 | tail -1 | tee -a "$LOG"
# the reference's recipe shape on the first 8 blocks: a whole 30-block pair of it does not fit one call (2026-12-04:
# neither tool finished it in 150 s; auto-round's first block took 22 s, then about 3 s each)
python3 bench/gpu_tune_pair.py build --layers 8 --model-dir /tmp/gpu-tune-model-8 2>&1 | tail -1 | tee -a "$LOG"
stamp "models built"
step() {  # step CAP TOOL ARGS...: one timed run, in its own process
    local cap=$1 tool=$2 left path; shift 2
    left=$((DEADLINE - (SECONDS - start)))
    if [ "$left" -lt 30 ]; then stamp "skipped $tool $*: ${left} s left"; return; fi
    path="$PWD/src"; [ "$tool" = reference ] && path="/tmp/site-ref"
    stamp "$tool $*"
    PYTHONPATH="$path" timeout $((cap < left ? cap : left)) python3 bench/gpu_tune_pair.py run --tool "$tool" \
        --out "$ROWS" "$@" 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | tail -25 >> "$LOG"
    stamp "rc=${PIPESTATUS[0]}"; tail -1 "$ROWS" 2>/dev/null
}
# 0. the GPU-only tuning tests: one synchronisation per step, the default device, the head on the tuning device
stamp "GPU tuning tests"
timeout 45 python3 -m pytest -q -p no:cacheprovider -rs tests/test_tuning.py -k synchronises 2>&1 | tail -5 | tee -a "$LOG"
timeout 60 python3 -m pytest -q -p no:cacheprovider -rs tests/test_placement.py tests/test_compile.py 2>&1 | tail -10 \
    | tee -a "$LOG"
# 1. the CPU protocol's shape: W4G32, iters 50, 32 x 256, batch 8
step 120 ours --iters 50
step 150 reference --iters 50
# where our time goes now (against docs/benchmarks.md's H200 profile: ~1000 launches, ~12 syncs per iteration)
stamp "profile"
timeout 90 python3 bench/profile_tune.py --device cuda --model /tmp/gpu-tune-model-8 --calib "$CARRY/tinyshakespeare.txt" \
    --blocks 2 --iters 30 --top 15 > "$OUT/profile.txt" 2>&1; stamp "profile rc=$?"
# 2. the reference's default recipe shape: iters 200, 128 x 2048, batch 8, on 8 blocks
step 150 ours --iters 200 --nsamples 128 --seqlen 2048 --model-dir /tmp/gpu-tune-model-8
step 150 reference --iters 200 --nsamples 128 --seqlen 2048 --model-dir /tmp/gpu-tune-model-8
# 3. torch.compile off at the short shape, both tools: whether compiling (about 20 s on the first block) pays there
step 90 ours --iters 50 --compile off
step 90 reference --iters 50 --compile off
stamp "end"
