# Quick start: `make demo` runs the whole tutorial pipeline on CPU; `make test` runs the tests.
# Both create .venv from this project's own files when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench peer-venv clean

$(STAMP): setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m mindrlhf.demo $(DEMO_ARGS)

# pytest-xdist workers, a test module whole on one (its fixtures built once). The suite's processes mostly use one
# core each and often wait (launchers, servers, subprocesses), so three keep two cores busy; TEST_WORKERS=0 runs
# it in one process.
TEST_WORKERS ?= 3
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q $(XDIST) tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q $(XDIST) tests -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) benchmarks/run_all.py

# The peer for benchmarks/bench_peer.py (TRL's RewardTrainer): its own venv, since TRL needs a newer transformers
# than MindFormers pins in .venv; also the peer of the LoRA work (peft: tests/data/hf_models/make_fixtures.py --peft,
# benchmarks/peer_lora.py), and OpenRLHF and verl without their dependencies (only their flags and client code are
# read). PyPI's torch is the multi-GB CUDA build: PEER_TORCH=/path/to/torch-*+cpu*.whl installs a CPU-only wheel
# instead (this machine image has one in pip's find-links folder, /opt/wheels).
PEER_VENV ?= .venv-peer
PEER_TORCH ?= torch
peer-venv:
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet $(PEER_TORCH)
	$(PEER_VENV)/bin/python -m pip install --quiet transformers trl datasets peft
	$(PEER_VENV)/bin/python -m pip install --quiet --no-deps openrlhf verl

clean:
	rm -rf demo_output output .pytest_cache
