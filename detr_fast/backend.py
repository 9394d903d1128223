"""Which implementation an op runs: the fast path (Triton kernel or the C++/CUDA extension) or the reference.

`DETR_FAST_BACKEND=reference|kernel|auto` in the environment, or `with detr_fast.backend("kernel"): ...` in Python
(the context manager wins over the environment):

- `auto` (default): CUDA tensors take the Triton kernels; tensors on any device take the extension detr_fast._C
  where it has an implementation; everything else takes the reference. A fast path that is missing (no triton, no
  extension) falls back to the reference with a warning, once per reason.
- `kernel`: the fast path or an error. Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (that is
  how the test suite runs them without a GPU).
- `reference`: the pure-PyTorch reference everywhere.

The decision is made in Python from the tensors' device, so it costs no host sync and torch.compile traces it as a
constant.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "kernel", "reference")
_override: list[str] = []
_warned: set[str] = set()


def current_backend() -> str:
    """The backend in force: the innermost `backend(...)` context, else $DETR_FAST_BACKEND, else "auto"."""
    if _override:
        return _override[-1]
    name = os.environ.get("DETR_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"DETR_FAST_BACKEND={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force every op inside the block onto one backend: "auto", "kernel" or "reference"."""
    if name not in BACKENDS:
        raise ValueError(f"backend({name!r}): expected one of {', '.join(BACKENDS)}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def warn_once(key: str, message: str) -> None:
    """Warn with `message` the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _probe_triton() -> str | None:
    """None when triton imports, else why it does not."""
    try:
        importlib.import_module("triton")
    except Exception as error:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(error).__name__}: {error})"
    return None


def _probe_extension() -> str | None:
    """None when detr_fast._C loads (which registers its ops with torch.library), else why it does not."""
    try:
        importlib.import_module("detr_fast._C")
    except Exception as error:
        return (
            f"the extension detr_fast._C is not available ({type(error).__name__}: {error}); "
            "build it with `pip install --no-build-isolation -e .`"
        )
    return None


# Probed once, when detr_fast is imported: the answers are then plain constants for torch.compile, which cannot
# trace an import inside a compiled step.
_probes: dict[str, str | None] = {"triton": _probe_triton(), "extension": _probe_extension()}


def _missing(component: str) -> str | None:
    """None when `component` ("triton" or "extension") is usable, else why it is not."""
    return _probes[component]


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def kernel_device(op: str, tensor: torch.Tensor) -> Iterator[None]:
    """Run a Triton launch on `tensor`'s device: CUDA (made the current device, as Triton launches on the current
    one: a tensor on cuda:1 while cuda:0 is current would be an illegal address), or CPU under TRITON_INTERPRET=1.
    RuntimeError naming `op` on any other device."""
    if tensor.device.type == "cuda":
        with torch.cuda.device(tensor.device):
            yield
        return
    if not (tensor.device.type == "cpu" and triton_interpreted()):
        raise RuntimeError(
            f"{op}: the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got "
            f"{tensor.device.type}; call the public detr_fast.ops function, which takes the reference there"
        )
    yield


def use_triton(op: str, device: torch.device) -> bool:
    """Whether `op` on tensors on `device` takes its Triton kernel (True) or its reference (False)."""
    mode = current_backend()
    if mode == "reference":
        return False
    missing = _missing("triton")
    if mode == "kernel":
        if missing:
            raise RuntimeError(f"{op}: DETR_FAST_BACKEND=kernel but {missing}")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"{op}: DETR_FAST_BACKEND=kernel on {device.type} tensors needs TRITON_INTERPRET=1 "
                "(set before triton is imported); Triton kernels run natively on CUDA tensors only"
            )
        return True
    if device.type != "cuda":
        return False
    if missing:
        warn_once("triton", f"detr_fast: {missing}; the ops use their PyTorch references")
        return False
    return True


def use_extension(op: str) -> bool:
    """Whether `op` takes its implementation in detr_fast._C (True) or its reference (False)."""
    mode = current_backend()
    if mode == "reference":
        return False
    missing = _missing("extension")
    if missing:
        if mode == "kernel":
            raise RuntimeError(f"{op}: DETR_FAST_BACKEND=kernel but {missing}")
        warn_once("extension", f"detr_fast: {missing}; {op} and the other extension ops use their references")
        return False
    return True


def describe() -> str:
    """One line saying which fast paths this installation has and, for those it lacks, why."""
    parts = []
    for component in ("extension", "triton"):
        missing = _missing(component)
        parts.append(f"{component}: {'available' if missing is None else missing}")
        if component == "extension" and missing is None:
            from .ops.linear_assignment import EXTENSION_DEVICES

            parts[-1] += f" (solver kernels: {', '.join(sorted(EXTENSION_DEVICES - {'meta'}))}"
            parts[-1] += ")" if "cuda" in EXTENSION_DEVICES else "; built without nvcc: CUDA uses the reference solver)"
    return f"detr_fast backend {current_backend()!r}; " + "; ".join(parts)
