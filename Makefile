# README command 1: `make demo` (tiny model + bundled demo data, CPU, a few minutes).
# README command 2: `make test` (the whole test suite; CI runs it through .ci/run, after `make lint`).
# Everyday work: `make test-fast` (unit tests, no process groups or subprocess trainings: under 2 minutes).
PYTHON ?= python3
VENV ?= .venv
# A CPU machine gets the CPU build of torch; where a GPU exists, TORCH_SPEC can name any build.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_run
# make test's processes (pytest-xdist): 2 for a 2-core CPU machine like CI's; `make test TEST_WORKERS=N` on a larger
# one. (test-fast runs in one: its tests are quick, and each extra process builds the test models again.)
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast lint clean-demo

# The project itself goes in last, editable and without dependencies (they are the requirements'): `finetune`
# is importable from any directory once the venv is activated (`. .venv/bin/activate`, README).
$(VENV)/.installed: requirements.txt requirements-extras.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" -r requirements.txt -r requirements-extras.txt -r requirements-dev.txt
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" sh scripts/demo.sh "$(DEMO_DIR)"

test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal tests

test-fast: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf "$(DEMO_DIR)"
