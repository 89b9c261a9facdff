# `make demo` and `make test` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dtprobe-installed
PYTEST_ARGS ?=

.PHONY: install demo readme-demo test test-all lint bench bench-quick clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test,frameworks,onnx]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dtprobe demo --out runs/demo

# regenerate README.md's demo table from a fresh demo (run on an idle machine: it states the time)
readme-demo: $(STAMP)
	$(PY) -m dtprobe demo --out runs/demo --fresh --update-readme README.md

test: $(STAMP)
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -m '' $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m pip install -e '.[test,bench]'
	$(PY) -m benchmarks.run

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf runs build *.egg-info .pytest_cache .ruff_cache
