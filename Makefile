# Two entry points (see README): `make demo` runs stylize on a real clip, `make test` runs the tests.
# Both create .venv and install the package into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLIP ?= ../shared/media/tuneavideo_man-skiing_718x718_29.97fps_aac.mp4

.PHONY: demo test install clean

install: $(VENV)/.installed

# torch first, pinned to the build that satisfies our range, so the package's dependencies never
# replace it (on this project's CPU machines pip takes torch 2.13.0's CPU wheel from local disk).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,train]"
	touch $@

demo: install
	$(VENV)/bin/stylize "$(CLIP)" --style oil --model tiny -o out/ -y

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
