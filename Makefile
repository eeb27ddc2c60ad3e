# signround — set-up and everyday targets.  `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned: 2.13.0 is a local CPU wheel here; letting pip resolve torch pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-accuracy bench-time bench-formats bench-speed bench-moe bench-memory venv-ref venv-interop venv-llama lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q "$(TORCH_PIN)" -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/signround fetch-model smollm2-135m
	$(BIN)/python bench/demo.py

# The interop tests run GPTQModel and Intel's auto-round from their own venvs (never signround dependencies).
test: install venv-ref venv-interop venv-llama
	$(BIN)/python -m pytest -q -p no:cacheprovider tests integration_tests

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: bench-accuracy

# Ours (every row), then the reference tool on the same setting, then the combined table.
bench-accuracy: install venv-ref
	$(BIN)/signround fetch-model smollm2-135m
	$(BIN)/python bench/accuracy.py --all
	.venv-ref/bin/python bench/reference_autoround.py --bits 4 --iters 50 --out bench/results/reference.jsonl
	.venv-ref/bin/python bench/reference_autoround.py --bits 4 --iters 0 --out bench/results/reference.jsonl
	.venv-ref/bin/python bench/reference_autoround.py --bits 4 --iters 50 --no_amp --out bench/results/reference.jsonl
	$(BIN)/python bench/accuracy.py --table

# One tuned SmolLM2 W4G32 asym model in every export format, reloaded and evaluated (bench/formats.py).
bench-formats: install
	$(BIN)/signround fetch-model smollm2-135m
	$(BIN)/python bench/accuracy.py --run fp32 --results /tmp/signround-bench/fp32.jsonl
	$(BIN)/python bench/formats.py

# CPU inference speed: fp32 vs W4G32 on the torch, torch_int4 and native backends (bench/speed.py).
bench-speed: install
	$(BIN)/signround fetch-model smollm2-135m
	$(BIN)/python bench/speed.py --threads 2

# Tuning time against auto-round as adjacent pairs (this VM's speed drifts; see bench/time_pair.py).
bench-time: install venv-ref
	$(BIN)/signround fetch-model smollm2-135m
	$(BIN)/python bench/time_pair.py --rounds 2

# MoE tuning time and checkpoint size against auto-round 0.16.1: a random 4-block Qwen3-MoE (8 experts, top-2,
# hidden 256), W4G32 sym, iters 50, same calibration ids for both (bench/moe.py; bench/results/moe.jsonl).
bench-moe: install venv-ref
	$(BIN)/python bench/moe.py --iters 50 --layers 4

# Peak host RSS with and without low_cpu_mem_usage (streaming save included): a random TinyLlama-1.1B-shaped model
# saved in bf16 (2.2 GB), W4G128, iters 0 and 2; then SmolLM2-135M W4G32 (bench/memory.py; bench/results/memory.jsonl).
bench-memory: install
	$(BIN)/signround fetch-model smollm2-135m
	$(BIN)/python bench/memory.py --iters 0 2
	$(BIN)/python bench/memory.py --model smollm2-135m --iters 0 50

# GPTQModel 7.6.0 (the last release that installs with torch 2.13) + optimum for transformers' GPTQ path, in its
# own venv, for integration_tests/test_interop.py.
venv-interop: .venv-interop/.installed

.venv-interop/.installed: Makefile
	test -x .venv-interop/bin/python || $(PY) -m venv .venv-interop
	.venv-interop/bin/python -m pip install -q --upgrade pip
	.venv-interop/bin/python -m pip install -q "$(TORCH_PIN)"
	.venv-interop/bin/python -m pip install -q "$(TORCH_PIN)" gptqmodel==7.6.0 optimum==2.3.0 transformers==5.24.0
	.venv-interop/bin/python -c "import torch, gptqmodel, optimum; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

# llama.cpp for the GGUF tests (ggml's own quantizer, llama-quantize's type mixtures, our files run by llama.cpp):
# llama-cpp-python 0.3.36 builds llama.cpp from source with cmake (~8 min on 2 cores; pip caches the wheel), in its
# own venv (it pins its own numpy); its source package, unpacked in .venv-llama/src, brings convert_hf_to_gguf.py.
# Built for this CPU but without AMX: llama.cpp's AMX matmul path segfaults in decode on Sapphire Rapids
# (ggml-org/llama.cpp#20824; measured here with 0.3.36), and never from pip's wheel cache, which would hand back a
# wheel built on another machine or with other flags.
LLAMA_CPP_PIN ?= llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
	-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
venv-llama: .venv-llama/.installed

.venv-llama/.installed: Makefile
	test -x .venv-llama/bin/python || $(PY) -m venv .venv-llama
	.venv-llama/bin/python -m pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" .venv-llama/bin/python -m pip install -q --no-cache-dir --force-reinstall \
		"$(LLAMA_CPP_PIN)" gguf==0.19.0
	.venv-llama/bin/python -m pip download -q --no-deps --no-binary :all: "$(LLAMA_CPP_PIN)" -d .venv-llama/src
	tar -xzf .venv-llama/src/llama_cpp_python-0.3.36.tar.gz -C .venv-llama/src
	.venv-llama/bin/python -c "import llama_cpp, gguf; print('llama-cpp-python', llama_cpp.__version__)"
	touch $@

# Intel's auto-round 0.16.1 in its own venv, for bench/reference_autoround.py and bench/gguf_reference.py (gguf and
# sentencepiece: its GGUF export); never a signround dependency.
# torch is pinned on every pip line so pip never swaps in another build; transformers as in .venv.
venv-ref: .venv-ref/.installed

.venv-ref/.installed: Makefile
	test -x .venv-ref/bin/python || $(PY) -m venv .venv-ref
	.venv-ref/bin/python -m pip install -q --upgrade pip
	.venv-ref/bin/python -m pip install -q "$(TORCH_PIN)"
	.venv-ref/bin/python -m pip install -q "$(TORCH_PIN)" auto-round==0.16.1 transformers==5.24.0 gguf==0.19.0 sentencepiece==0.2.3
	.venv-ref/bin/python -m pip check
	.venv-ref/bin/python -c "import torch, transformers, auto_round; from auto_round import AutoRound; \
		print('torch', torch.__version__, 'transformers', transformers.__version__, 'auto-round', auto_round.__version__)"
	touch $@

lint: install
	$(BIN)/ruff check src tests integration_tests bench
	$(BIN)/ruff format --check src tests integration_tests bench

format: install
	$(BIN)/ruff format src tests integration_tests bench
	$(BIN)/ruff check --fix src tests integration_tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info
