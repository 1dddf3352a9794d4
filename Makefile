# streamrec: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: run test venv bench clean

# Create the virtualenv and install the project (+ test extras) once per pyproject change.
# torch is installed first and pinned so no dependency can pull a different (CUDA) build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

# The main job on the embedded default (see README "What `make run` does").
run: $(STAMP)
	$(VENV)/bin/streamrec demo

# Every test in the default suite (real broker over TCP, real faust, real RocksDB, real torch).
test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_broker.py
	$(PY) scripts/bench_contracts.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
