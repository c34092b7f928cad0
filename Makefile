# make install: .venv with the project installed editable (idempotent)
# make test:    the test suite (CPU)
# make demo:    prepare the offline Bible benchmark, train a small SMoE on CPU (DEMO_MINUTES, default 15), evaluate
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q tests

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

clean:
	rm -rf runs/demo

# make gpu-check: the GPU check (scripts/gpu_check.sh; on a machine without CUDA its CPU part);
# GPU_CHECK_ARGS passes options, e.g. GPU_CHECK_ARGS="--out runs/gpu_check_h100"
.PHONY: gpu-check
gpu-check: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PYTHON="$(CURDIR)/$(PY)" bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)
