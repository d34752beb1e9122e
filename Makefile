# Two entry points (see README): `make demo` stylizes a clip with the default model, `make test` runs the tests.
# Both create .venv and install the package into it first, with the test, train and cluster (Ray) extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install clean

install: $(VENV)/.installed

# torch first, pinned to the build that satisfies our range, so the package's dependencies never
# replace it (on this project's CPU machines pip takes torch 2.13.0's CPU wheel from local disk).
# Each step says what it is doing; pip's own lines (what it collects, downloads and installs) show
# through on the two long steps, which take a few minutes on a first set-up.
$(VENV)/.installed: pyproject.toml
	@echo "==> set-up 1/4: creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> set-up 2/4: upgrading pip"
	$(PY) -m pip install -q --upgrade pip
	@echo "==> set-up 3/4: installing torch 2.13.0 (pinned first; the largest download)"
	$(PY) -m pip install "torch==2.13.0"
	@echo "==> set-up 4/4: installing stylize and its dependencies (diffusers, transformers, av, ...) into $(VENV)"
	$(PY) -m pip install -e ".[test,train,cluster]"
	@touch $@
	@echo "==> set-up done: $(VENV) is ready (make re-runs it only when pyproject.toml changes)"

demo: install
	@echo "==> stylizing a clip with the default model into out/demo/ (a clip made from a shipped still when ../shared is absent)"
	$(PY) scripts/demo.py

test: install
	@echo "==> running the test suite on the CPU (a few minutes)"
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
