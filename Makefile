# Two commands for a newcomer: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Test modules side by side: about half of an e2e test is waiting (Ray starting, jobs,
# servers), so two processes keep 2 cores busy (86% against 50% in one). Each module runs
# whole in one process (--dist loadfile): its module-scoped cluster or app stays shared.
# Modules are handed out longest first (tests/conftest.py): xdist's own reordering, by
# the number of tests in a module, would start the 9-test training module last and leave
# one process idle for its whole run. A worker that dies (a native crash) ends the run
# naming its test: xdist's replacement worker can wait forever under loadfile
# (pytest-xdist #784, #1323).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --max-worker-restart 0

.PHONY: demo test test-unit test-ray test-e2e lint bench manifests clean

# uv installs the same resolution as pip about 3x faster (downloads and unpacking in
# parallel: 105 s against 252 s from cold caches here). Bytecode is compiled at install,
# as pip does, because imports never write it where PYTHONDONTWRITEBYTECODE is set (CI),
# and TensorFlow then imports in 10 s instead of 29. Where uv cannot install (an index
# set only in pip.conf, which uv does not read), pip does it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	( $(BIN)/python -m pip install --quiet 'uv>=0.13,<1' && \
	  $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[dev]' ) || \
	( $(BIN)/python -m pip install --quiet --upgrade pip && \
	  $(BIN)/python -m pip install --quiet -e '.[dev]' )
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/detector demo --workdir demo-output

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q $(XDIST)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m unit

test-ray: $(STAMP)
	$(BIN)/python -m pytest -q -m ray

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m e2e

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: $(STAMP)
	for b in bench/[!_]*.py; do $(BIN)/python $$b || exit 1; done

manifests: $(STAMP)
	$(BIN)/python -m detector.deploy render cluster/

clean:
	rm -rf $(VENV) demo-output bench/results test-artifacts
