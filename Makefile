# Two entry points: `make demo` (the benchmark on offline data) and `make test`.
PYTHON ?= python3
# JAX's LAPACK calls on CPU (SNGD's refreshes) run in scipy's OpenBLAS: one
# thread keeps it from competing with XLA's threads (README, Scale).
export OPENBLAS_NUM_THREADS ?= 1
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[dev]'
	touch $(STAMP)

# Peers that cannot live beside the project's pins get their own venvs:
# kfac-jax 0.0.8 needs jax 0.9.0; psgd-jax 0.2.9 needs optax < 0.2.5.
PEER_DEPS := flax mnist1d scikit-learn
.peers/kfac/.installed: pyproject.toml
	$(PYTHON) -m venv .peers/kfac
	.peers/kfac/bin/pip install 'jax==0.9.0' 'jaxlib==0.9.0' 'kfac-jax==0.0.8' optax $(PEER_DEPS)
	.peers/kfac/bin/pip install --no-deps -e .
	touch $@

.peers/psgd/.installed: pyproject.toml
	$(PYTHON) -m venv .peers/psgd
	.peers/psgd/bin/pip install 'psgd-jax==0.2.9' 'optax==0.2.4' jax $(PEER_DEPS)
	.peers/psgd/bin/pip install --no-deps -e .
	touch $@

.PHONY: demo test lint docs bench-full peers mutants
demo: $(STAMP)
	$(VENV)/bin/python -m sngd_jax.bench

peers: .peers/kfac/.installed .peers/psgd/.installed

bench-full: $(STAMP) peers
	$(VENV)/bin/python -m sngd_jax.bench --suite full

# Lint (ruff), types (mypy on the library), then the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/python -m pytest -n 2 --maxschedchunk 1 --durations=15 tests

# The API reference, from the docstrings (the public names of sngd_jax);
# a warning fails it.
docs: $(STAMP)
	$(VENV)/bin/python docs/reference.py build/reference
	@echo "open build/reference/index.html"

# Every deliberate bug in tests/mutants.py must fail a test (35-50 min on 2 cores).
mutants: $(STAMP)
	$(VENV)/bin/python tests/mutants.py
