#!/usr/bin/env bash
# `make pins`: re-resolve the pinned environments to the newest releases the registry serves, test them, and only
# then rewrite the constraints files. Run it deliberately, review the diff of requirements/, commit.
#
#   requirements/constraints.txt                what `make test` / `make lint` / `make demo` install (transformers 5.x)
#   requirements/constraints-transformers4.txt  what `make test-transformers4` installs (the newest transformers 4.x)
#
# Each environment is built from nothing in a scratch venv with no constraints (torch stays at TORCH_PACKAGES: other
# torch releases are several GB of downloads), the project is installed editable with its extras, the tests run
# (the whole suite and the linters, or the transformers-facing tests for 4.x), and `pip freeze --all` becomes the
# new pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PACKAGES=${TORCH_PACKAGES:-torch==2.14.1 torchvision==0.29.1}

resolve() {  # resolve VENV OUTPUT EXTRAS EXTRA_REQUIREMENT PYTEST_ARGS...
    local venv=$1 output=$2 extras=$3 extra=$4
    shift 4
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel ninja
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install --quiet $TORCH_PACKAGES
    # A fresh venv: pip takes the newest release of everything that is not named here.
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install --quiet --no-build-isolation -e ".[$extras]" $TORCH_PACKAGES $extra
    "$venv/bin/python" -m pip install --quiet --no-deps panopticapi-lite  # asks for numpy<2; runs on numpy 2
    "$venv/bin/python" -m pytest -q "$@"
    if [[ $extras == *lint* ]]; then
        "$venv/bin/ruff" check . && "$venv/bin/ruff" format --check . && "$venv/bin/lint-imports"
    fi
    {
        echo "# Written by requirements/resolve.sh (make pins) on $(date -u +%Y-%m-%d) with $("$venv/bin/python" -V)"
        echo "# on $(uname -sm), after the tests passed on exactly these releases. Do not edit by hand."
        "$venv/bin/python" -m pip freeze --all --exclude-editable | grep -v -i '^detr[-_]fast=='
    } > "$output.new"
    mv "$output.new" "$output"
    rm -rf "$venv"
    echo "wrote $output"
}

resolve .venv-resolve requirements/constraints.txt test,plot,lint ""
resolve .venv-resolve-transformers4 requirements/constraints-transformers4.txt test "transformers<5" -m transformers
