"""What the project puts on the import path: `detr_fast` and nothing else. The Triton sources live in the top-level
folder `kernels/`, which must never shadow the distribution named `kernels` (transformers >= 5.25 imports it)."""

import ast
import importlib
import importlib.machinery
import importlib.metadata
import os
import subprocess
import sys

import pytest

import detr_fast.kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_KERNELS = os.path.join(ROOT, "kernels")


def python_in_root(code: str) -> subprocess.CompletedProcess:
    """Run `python -c code` started in the repository root, where sys.path[0] is that root."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_detr_fast_kernels_is_the_kernels_folder():
    assert os.path.dirname(os.path.abspath(detr_fast.kernels.__file__)) == OUR_KERNELS
    attention = importlib.import_module("detr_fast.kernels.attention")
    assert os.path.dirname(os.path.abspath(attention.__file__)) == OUR_KERNELS


def test_import_kernels_in_the_root_is_never_ours():
    installed = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or ".") != ROOT]
    )
    result = python_in_root("import sys, kernels; print(sys.path[0] == ''); print(kernels.__file__)")
    if installed is None:
        assert result.returncode == 1 and "ModuleNotFoundError: No module named 'kernels'" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        on_path, found = result.stdout.split()
        assert on_path == "True"  # the root was on sys.path: the case that used to pick our folder
        assert os.path.abspath(found) == os.path.abspath(installed.origin)
        assert not os.path.abspath(found).startswith(OUR_KERNELS)


def test_import_kernels_without_the_distribution_is_module_not_found():
    # Every site-packages folder off the path: what a machine without the `kernels` distribution sees.
    result = python_in_root(
        "import sys\n"
        "sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as error:\n"
        "    print('not-found', error.name, 'kernels' in sys.modules)\n"
        "else:\n"
        "    print('imported', kernels.__file__)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["not-found", "kernels", "False"]


def test_import_kernels_under_pytest_is_never_ours():
    assert ROOT in [os.path.abspath(p or ".") for p in sys.path]  # pytest put the root on the path
    try:
        module = importlib.import_module("kernels")
    except ModuleNotFoundError:
        return
    assert not os.path.abspath(module.__file__).startswith(OUR_KERNELS)


def test_the_only_installed_top_level_name_is_detr_fast():
    owners = importlib.metadata.packages_distributions()
    ours = sorted(name for name, distributions in owners.items() if "detr-fast" in distributions)
    if not ours:
        pytest.skip("detr-fast is not installed as a distribution (run from a plain checkout)")
    assert ours == ["detr_fast"]


def test_kernels_import_only_dispatch_and_reference():
    """The layering of docs/design.md for the Triton kernels, which lie outside detr_fast/ where import-linter reads
    the import graph: kernels import triton, torch and each other, and of detr_fast only dispatch and reference."""
    allowed = ("detr_fast.dispatch", "detr_fast.reference", "detr_fast.kernels")
    found = {}
    for name in sorted(os.listdir(OUR_KERNELS)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(OUR_KERNELS, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against detr_fast.kernels
                base = ["detr_fast", "kernels"][: 2 - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom):
                module = node.module
            elif isinstance(node, ast.Import):
                module = node.names[0].name
            else:
                continue
            if module.startswith("detr_fast"):
                found.setdefault(name, set()).add(module)
    imported = {module for modules in found.values() for module in modules}
    assert imported and all(module.startswith(allowed) for module in imported), found
