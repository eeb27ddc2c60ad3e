#!/usr/bin/env bash
# Fills .whl/ with what bench/gpu_check.sh needs on a lent GPU machine that the device image lacks and cannot
# fetch (no network there): gptqmodel 7.6.0 (the series our [cuda] extra pins) and the packages it imports.
# Most ship only as sdists, so the pure-Python ones are built into wheels here; PyPcre is a C extension with no
# wheel for the device's Python 3.12, so it travels as its sdist and gpu_check.sh compiles it there.
# torchao is left out on purpose: transformers imports it when present, and triton with it, at import time.
#   bash bench/gpu_wheels.sh         then: device run "bash bench/gpu_check.sh" with carry [".whl", ".gpucache"]
set -euo pipefail
PY="${PY:-.venv/bin/python}"
SDISTS="gptqmodel==7.6.0 pypcre==0.6.4 device-smi==0.5.7 logbar==0.4.15 tokenicer==0.0.14 defuser==0.0.28"
WHEELS="datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 httpx2==2.16.2"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
rm -rf .whl; mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" $SDISTS
for sdist in "$tmp"/*.tar.gz; do
    case "$(basename "$sdist")" in
        pypcre-*) cp "$sdist" .whl/ ;;
        *) "$PY" -m pip wheel -q --no-deps -w .whl "$sdist" ;;
    esac
done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
ls .whl
