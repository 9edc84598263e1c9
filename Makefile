# flowssm: every target sets up what it needs.
VENV := .venv
PY := $(VENV)/bin/python
# Find a Python >= 3.12 (JAX >= 0.11 needs it): PATH first, then pyenv installs.
PYTHON312 := $(shell for p in python3.13 python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 $$HOME/.pyenv/versions/3.13*/bin/python3.13 /usr/bin/python3.12 /usr/local/bin/python3.12; do \
	  if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then command -v $$p; break; fi; done)

# jax's CPU LAPACK calls go through OpenBLAS; its threads fight XLA's for the cores.
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: venv demo train test clean

$(VENV)/.installed: pyproject.toml
	@if [ -z "$(PYTHON312)" ]; then \
	  echo "error: flowssm needs Python >= 3.12 (JAX >= 0.11 requires it); none found on PATH or under ~/.pyenv/versions. Install one (e.g. 'pyenv install 3.12') and retry." >&2; exit 1; fi
	@echo "using $(PYTHON312)"
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m flowssm.demo

train: venv
	$(VENV)/bin/flowssm train configs/lm_tiny.yaml

test: venv
	$(PY) -m pytest -n 2 --dist worksteal --nbmake --durations=25 tests notebooks

clean:
	rm -rf $(VENV)
