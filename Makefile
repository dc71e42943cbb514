# clinical_bert_jax — developer entry points. Every target installs what it needs into .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Parallelism tests simulate 8 devices on the CPU.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3 \
            HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEMO_DIR ?= demo_out

.PHONY: install lint test test-fast demo bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Everything (<= 15 min on 2 cores).
test: install
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

# The unit tier (< 3 min on 2 cores): no training runs, no CLI subprocess suites, no TF/PyTorch oracles.
test-fast: install
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=10 -m "not slow" tests

demo: install
	$(TEST_ENV) bash scripts/demo.sh $(DEMO_DIR)

bench: install
	$(TEST_ENV) bash bench/run_all.sh

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
