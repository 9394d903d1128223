"""Triton kernels, importable only as detr_fast.kernels: @triton.jit functions and their launch helpers.

Importing this package imports nothing; each kernel module imports triton, and detr_fast.ops imports those only on
the paths that launch a kernel.

The folder sits at the repository root (the layout of docs/design.md), so wherever the root is on sys.path (python
or pytest started there) a plain `import kernels` would find it before the distribution named `kernels`, which
transformers imports. Under any name but detr_fast.kernels this file therefore steps aside: it hands the name to
the module the rest of sys.path holds, or fails as if the folder were not there.
"""

if __name__ != "detr_fast.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    # The import statement returns what sys.modules holds once this file has run: the other module.
    sys.modules[__name__] = _module
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
