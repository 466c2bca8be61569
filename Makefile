# softgrad: `make demo` runs the main job on the built-in data, `make test` installs everything and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
# The CPU build of PyTorch is installed by exact version first: a looser requirement would pull a multi-GB CUDA build.
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton

.PHONY: demo test install install-all bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install --quiet -e ".[fast,sklearn]"
	touch $@

$(VENV)/.installed-all: $(VENV)/.installed
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet "$(TRITON_SPEC)"
	$(PIP) install --quiet -e ".[all,test]"
	touch $@

install: $(VENV)/.installed
install-all: $(VENV)/.installed-all

demo: $(VENV)/.installed
	$(VENV)/bin/softgrad explain --logits 0.3 0.5 0.2 --target 1
	$(VENV)/bin/softgrad check
	$(VENV)/bin/softgrad train --out runs/demo

test: $(VENV)/.installed-all
	$(PY) -m pytest -q

bench: $(VENV)/.installed-all
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
