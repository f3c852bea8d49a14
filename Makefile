# Two commands for a fresh machine (see README.md):
#   make quickstart   set up .venv, then run examples/quickstart.yaml on embedded defaults
#   make test         set up .venv, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first: a plain `torch` dependency would pull a multi-GB CUDA build
TORCH ?= torch==2.13.0

.PHONY: setup test test-full quickstart lint schema bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[dev]'
	# pip compiles what it installs, but not an editable project's own sources: compiled once here, so that
	# each process (Ray workers, drivers) need not compile them again where PYTHONDONTWRITEBYTECODE is set
	$(PY) -m compileall -q pipeline stages schemas cluster arpipe > /dev/null
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/pytest -q

# the full fault campaigns too (>= 10 kills per stage kind; `make test` runs a seeded subset)
test-full: setup
	$(VENV)/bin/pytest -q -m "full or not full"

quickstart: setup
	cd examples && ../$(VENV)/bin/arpipe run quickstart.yaml

lint: setup
	$(VENV)/bin/ruff check .

schema: setup
	$(PY) -m arpipe.schemas.export

bench: setup
	$(VENV)/bin/pip install -q -e '.[bench]' $(TORCH)   # dvc and litdata, the anchors; torch kept as set up
	$(PY) benchmarks/run_all.py

clean:
	rm -rf examples/arpipe-runs examples/mlflow.db examples/mlruns
