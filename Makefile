# Two entry points: `make demo` (the benchmark on offline data) and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[dev]'
	touch $(STAMP)

.PHONY: demo test bench-full
demo: $(STAMP)
	$(VENV)/bin/python -m sngd_jax.bench

bench-full: $(STAMP)
	$(VENV)/bin/python -m sngd_jax.bench --suite full

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 tests
