# Two entry points: `make demo` (the benchmark on offline data) and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[dev]'
	touch $(STAMP)

# K-FAC needs jax 0.9.0 (kfac-jax 0.0.8 fails with jax 0.10.x): its own venv.
PEER := .peers/kfac
$(PEER)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install 'jax==0.9.0' 'jaxlib==0.9.0' 'kfac-jax==0.0.8' flax optax mnist1d scikit-learn
	$(PEER)/bin/pip install --no-deps -e .
	touch $@

.PHONY: demo test bench-full peers
demo: $(STAMP)
	$(VENV)/bin/python -m sngd_jax.bench

peers: $(PEER)/.installed

bench-full: $(STAMP) peers
	$(VENV)/bin/python -m sngd_jax.bench --suite full

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 tests
