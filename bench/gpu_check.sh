#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the `device` tool; never CI).  The device image has CUDA torch,
# transformers, accelerate, safetensors, triton, nvcc and ninja but no network, so signround runs from src/ and
# gptqmodel is used only if it was carried in .whl/ (see /work/.library/device/README.md): gptqmodel 7.6.0 and its
# pure-Python needs as wheels built here (`pip wheel --no-deps gptqmodel==7.6.0 device-smi logbar tokenicer
# defuser`, plus datasets, dill, multiprocess, httpx2 from PyPI; not torchao: transformers imports it, and with it
# triton, at import), and PyPcre as its sdist, compiled there against the system libpcre2 (no cp312 wheel exists).
# Results go to $OUT (at most 8 files come back).
# GPTQModel's CUDA kernels come compiled from here in .gpucache/prebuilt/ (bash bench/gpu_prebuild.sh): the first
# run, 2026-11-26, compiled them on the device and lost Marlin fp16 to the time limit.
#   here: bash bench/gpu_wheels.sh && bash bench/gpu_prebuild.sh
#   device run: bash bench/gpu_check.sh    carry [".whl", ".gpucache"], timeout_s 600
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
start=$SECONDS
stamp() { echo "[$((SECONDS - start)) s] $*"; }
{
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    nproc; gcc --version | head -1; nvcc --version | tail -1
    python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
} 2>&1 | tee "$OUT/setup.txt"
if compgen -G ".whl/*" > /dev/null; then
    # a second call on the same warm machine finds the install and GPTQModel's builds (~/.cache/gptqmodel) done
    [ -d /tmp/site/gptqmodel ] || timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --no-build-isolation --target /tmp/site .whl/*.whl .whl/*.tar.gz 2>&1 | tail -5 \
        | tee -a "$OUT/setup.txt"
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    stamp "wheels installed" | tee -a "$OUT/setup.txt"
    # GPTQModel's kernels compiled ahead of time on the CPU machine (bash bench/gpu_prebuild.sh), put where its
    # loader looks before compiling; a library that does not load here is skipped and compiled as before
    if [ -f .gpucache/prebuilt/manifest.json ]; then
        timeout 120 python3 bench/gpu_prebuilt.py install .gpucache/prebuilt 2>&1 | tail -5 | tee -a "$OUT/setup.txt"
    fi
    # GPTQModel's builds from an earlier loan, if carried back (archived below): its cache is keyed by
    # sources, flags, torch, CUDA and GPU, so on the same image they load instead of compiling
    if compgen -G ".gpucache/gptqmodel_*.tgz" > /dev/null; then
        mkdir -p "$HOME/.cache/gptqmodel"
        for t in .gpucache/gptqmodel_*.tgz; do tar xzf "$t" -C "$HOME/.cache/gptqmodel"; done
        stamp "GPTQModel builds restored: $(ls .gpucache)" | tee -a "$OUT/setup.txt"
    fi
    # Load each kernel once: with prebuilt libraries this takes seconds.  Otherwise GPTQModel compiles them, on
    # the CPU: on the H100 machine (16 cores), built three at once, ExLlamaV2 took 109 s, Marlin bf16 222 s and
    # Marlin fp16 more than 280 s (2026-11-26).  A build cut short is lost, so builds get time to finish, the
    # Triton suite fills the wait, and every timing waits for them (they load the CPU; eager decode is CPU-bound).
    for ext in marlin_fp16 marlin_bf16 exllamav2; do
        ( t0=$SECONDS; timeout 420 python3 -c "from gptqmodel import extension; print(extension.load(name='$ext'))" \
            > "/tmp/prewarm_$ext.log" 2>&1; echo "$ext: rc=$? after $((SECONDS - t0)) s" >> /tmp/prewarm_rc.log ) &
    done
    for _ in $(seq 20); do jobs -r | grep -q . || break; sleep 1; done  # loaded, or compiling
fi
# each step's timeout is cut to what is left of the call (DEADLINE seconds, a little under the run's timeout_s),
# so the steps after a slow one still start; the most wanted results come first
DEADLINE="${DEADLINE:-580}"
step() {  # step CAP_SECONDS OUT_FILE TITLE COMMAND...
    local cap=$1 file=$2 title=$3 left; shift 3
    left=$((DEADLINE - (SECONDS - start)))
    stamp "$title" | tee -a "$OUT/$file"
    if [ "$left" -lt 15 ]; then echo "skipped: ${left} s left" | tee -a "$OUT/$file"; return; fi
    timeout $((cap < left ? cap : left)) "$@" 2>&1 | tr '\r' '\n' | grep -v "Compiling extension" | tee -a "$OUT/$file"
}
triton_suite() {  # SKIP_TRITON_SUITE=1 for a second call: the suite ran in the first
    [ -n "${SKIP_TRITON_SUITE:-}" ] && return
    SKIP_TRITON_SUITE=1
    step 240 pytest_triton.txt "triton suite" python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_triton.py
}
if jobs -r | grep -q .; then triton_suite; fi  # GPTQModel is compiling: use the wait
wait
stamp "GPTQModel kernels loaded" | tee -a "$OUT/setup.txt"
for f in /tmp/prewarm_rc.log /tmp/prewarm_[em]*.log; do [ -f "$f" ] && { echo "== $f"; tail -c 3000 "$f"; }; done \
    | tr '\r' '\n' | grep -v "Compiling extension" >> "$OUT/setup.txt"
# GPTQModel's libraries built here, if any, one archive per extension (8 files come back, 16 MiB each), saved as
# soon as the builds end: copy them to .gpucache/ and carry it next time to skip the builds
for name in marlin_fp16 marlin_bf16 exllamav2; do  # the CUDA kernels only: 8 files come back in all
    dir="$HOME/.cache/gptqmodel/torch_extensions/$name"
    [ -d "$dir" ] && [ -n "$(find "$dir" -name build.ninja -print -quit)" ] || continue  # not compiled here
    (cd "$HOME/.cache/gptqmodel" && find "torch_extensions/$name" -name '*.so' -print0 \
        | tar czf "$OUT/gptqmodel_$name.tgz" --null -T -) 2>/dev/null
    size=$(stat -c %s "$OUT/gptqmodel_$name.tgz" 2>/dev/null || echo 0)
    if [ "$size" -le 1024 ] || [ "$size" -gt $((16 * 1024 * 1024)) ]; then
        echo "GPTQModel build $name not archived ($size bytes)" | tee -a "$OUT/setup.txt"
        rm -f "$OUT/gptqmodel_$name.tgz"
    fi
done
step 150 pytest.txt "gptqmodel, torch + selection suites" python3 -m pytest -q -p no:cacheprovider -rs \
    tests/test_kernels_gptqmodel.py tests/test_kernels_torch.py tests/test_kernel_select.py tests/test_kernel_matrix.py
step 90 gpu_kernels.txt "layer bench" python3 bench/gpu_kernels.py
step 200 gpu_decode.txt "model decode bench" python3 bench/gpu_decode.py --new-tokens 64
step 90 gpu_kernels.txt "triton launch shapes at one row" python3 bench/gpu_kernels.py --triton-tiles
triton_suite
stamp "end" | tee -a "$OUT/setup.txt"
