# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv from nothing (torch,
# the project with its extension, the test/plot extras) and then runs its job. `make bench` runs the benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On the development machines these releases lie on local disk; elsewhere pip downloads them.
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.detr_fast-installed
BUILD_INPUTS := pyproject.toml setup.py $(wildcard csrc/*)

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PACKAGES)
	$(PIP) install --quiet setuptools wheel ninja
	$(PIP) install --quiet --no-build-isolation -e '.[test,plot]'
	$(PY) -c "from detr_fast.backend import describe; print(describe())"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/detr-fast demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/detr-fast bench --quick

clean:
	rm -rf $(VENV) build *.egg-info detr_fast/_C*.so
