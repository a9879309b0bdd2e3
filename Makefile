# Quick start: `make demo` runs the whole tutorial pipeline on CPU; `make test` runs the tests.
# Both create .venv from this project's own files when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean

$(STAMP): setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m mindrlhf.demo $(DEMO_ARGS)

test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) benchmarks/run_all.py

clean:
	rm -rf demo_output output .pytest_cache
