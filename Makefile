# Set-up and the two everyday commands. `make demo` and `make test` each create the virtual environment
# when it is missing, install torch (the CPU build where no CUDA is present) and then the project at the versions
# of constraints.txt (`CONSTRAINTS=` resolves afresh, e.g. on a Python the file was not resolved for; .ci/lock
# re-resolves it).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mitoseg-installed
TORCH ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt

.PHONY: install demo test lint bench clean

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS)) -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mitoseg segment configs/demo.yaml

test: $(STAMP)
	-bash .ci/install-chromium
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) data/demo
