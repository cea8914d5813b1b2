# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# torch is installed first, pinned to the CPU build that lies on this machine's disk, so that
# nothing pulls a multi-GB CUDA build; everything else comes from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint venv clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/domainlm demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check domainlm tests benchmarks scripts
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check domainlm tests benchmarks scripts
	$(VENV)/bin/ruff format --check domainlm tests benchmarks scripts

clean:
	rm -rf $(VENV) demo-run
