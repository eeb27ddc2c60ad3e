# signround — set-up and everyday targets.  `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned: 2.13.0 is a local CPU wheel here; letting pip resolve torch pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-accuracy lint format clean

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

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests integration_tests

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: bench-accuracy

bench-accuracy: install
	$(BIN)/signround fetch-model smollm2-135m
	$(BIN)/python bench/accuracy.py --all

lint: install
	$(BIN)/ruff check src tests integration_tests bench
	$(BIN)/ruff format --check src tests integration_tests bench

format: install
	$(BIN)/ruff format src tests integration_tests bench
	$(BIN)/ruff check --fix src tests integration_tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info
