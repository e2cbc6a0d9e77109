# Two entry points that work on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv at the repository root. torch is installed first, pinned, so that pip does not pull a
# several-GB CUDA build on CPU-only machines; override with `make TORCH=torch==X.Y.Z ...` on other hardware.
VENV  := .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/scalora train configs/tiny.yaml

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
