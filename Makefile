# Two entry points that work on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv at the repository root and install exactly the stack the suite last passed with:
# torch pinned here (installed first, so that pip does not pull a several-GB CUDA build on CPU-only machines), every
# other package pinned in constraints.txt. On other hardware pass the torch build you want and drop the pins (an
# untested stack): `make TORCH=torch==2.5.1 CONSTRAINTS= demo`.
VENV        := .venv
PY          := $(VENV)/bin/python
TORCH       ?= torch==2.13.0
PIP         ?= pip==26.3
CONSTRAINTS ?= constraints.txt
PIN_FLAGS   := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: demo test test-fast install lock clean gpu-wheels gpu-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(PIP)"
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q $(PIN_FLAGS) -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/scalora train configs/tiny.yaml

test: install
	$(PY) -m pytest -q

test-fast: install   # the core, config, data and planner tests: under a minute, for iteration
	$(PY) -m pytest -q -m "not slow"

# Refresh the pins: resolve the newest compatible stack in a scratch venv and write constraints.txt from it.
# The refreshed stack must pass `make test` (from a clean clone) before it is committed.
lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q "$(PIP)"
	.venv-lock/bin/python -m pip install -q "$(TORCH)"
	.venv-lock/bin/python -m pip install -q -e ".[test]"
	{ echo "# The stack the test suite passed with (pip -c). Written by \`make lock\`; torch is pinned in the Makefile."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|scalora)[=@ ]'; } > constraints.txt
	rm -rf .venv-lock
	@echo "constraints.txt refreshed: now run 'make clean test' and commit it only if the suite passes"

# The GPU check (bench/gpu.sh): gather the wheels where a registry is reachable, run the check on the GPU machine
# (which has torch, transformers, accelerate and peft; make is not needed there: `bash bench/gpu.sh`).
gpu-wheels:
	python3 bench/gpu_wheels.py

gpu-check:
	bash bench/gpu.sh

clean:
	rm -rf $(VENV) runs
