# The README's commands. `make demo` and `make test` each create .venv from nothing with the pinned releases of
# requirements/constraints.txt (torch, the project with its extension, the test/plot extras) and then run their
# job; the same commit gives the same environment whatever the registry publishes later.
#
#   make test                 the whole test suite
#   make lint                 ruff check, ruff format --check, import-linter's layering contracts (pyproject.toml)
#   make demo                 train and evaluate the demo model (runs/demo/)
#   make bench                the benchmark suite, quick form
#   make test-transformers4   the transformers-facing tests against the newest transformers 4.x (.venv-transformers4)
#   make pins                 re-resolve both pinned sets to the newest releases, test them, rewrite requirements/
PYTHON ?= python3
VENV := .venv
CONSTRAINTS := requirements/constraints.txt
VENV4 := .venv-transformers4
CONSTRAINTS4 := requirements/constraints-transformers4.txt
EXTRAS := test,plot,lint
BUILD_INPUTS := pyproject.toml setup.py $(wildcard csrc/*)

.PHONY: demo test lint bench install test-transformers4 pins clean

install: $(VENV)/.detr_fast-installed

# $(call setup,VENV,CONSTRAINTS,EXTRAS): a venv with pip, torch, the build tools and the project, all pinned; and
# panopticapi (the PQ tests' oracle) without its declared dependencies: it asks for numpy<2, which torch does not
# pair with, and runs on numpy 2.
define setup
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --constraint $(2) pip
	$(1)/bin/python -m pip install --quiet --constraint $(2) torch torchvision
	$(1)/bin/python -m pip install --quiet --constraint $(2) setuptools wheel ninja
	$(1)/bin/python -m pip install --quiet --constraint $(2) --no-build-isolation -e '.[$(3)]'
	$(1)/bin/python -m pip install --quiet --constraint $(2) --no-deps panopticapi-lite
	$(1)/bin/python -c "from detr_fast.dispatch import describe; print(describe())"
	touch $(1)/.detr_fast-installed
endef

$(VENV)/.detr_fast-installed: $(BUILD_INPUTS) $(CONSTRAINTS)
	$(call setup,$(VENV),$(CONSTRAINTS),$(EXTRAS))

$(VENV4)/.detr_fast-installed: $(BUILD_INPUTS) $(CONSTRAINTS4)
	$(call setup,$(VENV4),$(CONSTRAINTS4),test)

demo: install
	$(VENV)/bin/detr-fast demo

test: install
	$(VENV)/bin/python -m pytest -q

test-transformers4: $(VENV4)/.detr_fast-installed
	$(VENV4)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(VENV4)/bin/python -m pytest -q -m transformers

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

bench: install
	$(VENV)/bin/detr-fast bench --quick

pins:
	requirements/resolve.sh

clean:
	rm -rf $(VENV) $(VENV4) build *.egg-info detr_fast/_C*.so
