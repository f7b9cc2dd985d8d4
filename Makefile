# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing, installs torch==2.13.0 only when no torch is importable
# (a CPU build; with a GPU, install your own CUDA torch into .venv first), then the project.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.subspace-sweep-installed

.PHONY: demo test test-properties test-integration bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test,peft]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/subspace-sweep demo --out demo-out --overwrite

test: $(STAMP)
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest

test-properties: $(STAMP)
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest tests/properties

test-integration: $(STAMP)
	$(PY) -m pytest -m integration tests/integration

bench: $(STAMP)
	$(PY) benchmarks/bench_sweep.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
