"""Which implementation an op runs: its fast path (a Triton kernel or the extension detr_fast._C) or its reference.

`DETR_FAST_BACKEND=reference|kernel|auto` in the environment, or `with detr_fast.backend("kernel"): ...` in Python
(the context manager wins over the environment):

- `auto` (default): CUDA tensors take the Triton kernels; tensors on any device take the extension where it has a
  kernel for their device; everything else takes the reference. A fast path that is missing falls back to the
  reference with a warning, once per reason.
- `kernel`: the fast path or an error. Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (that is
  how the test suite runs them without a GPU).
- `reference`: the pure-PyTorch reference everywhere.

What this installation can run is probed once, when detr_fast is imported, into one table (MISSING and
EXTENSION_KERNELS below): the decision is then made in Python from constants and the tensors' device, so it costs
no host sync and torch.compile traces it as a constant.
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


def fall_back(op: str, reason: str, key: str | None = None) -> None:
    """The fast path of `op` cannot run, for `reason`: RuntimeError under the "kernel" backend, else a warning
    (once per `key`, default the reason) that the reference runs instead."""
    if current_backend() == "kernel":
        raise RuntimeError(f"{op}: DETR_FAST_BACKEND=kernel but {reason}")
    warn_once(key or reason, f"detr_fast: {reason}; {op} uses its PyTorch reference")


# ------------------------------------------------------------------------------------------- the capability table


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


# The ops detr_fast._C defines (csrc/ops.cpp registers them all).
EXTENSION_OPS = ("linear_assignment", "match_cost_cpu", "leaders_cpu", "bilinear_points_cpu")


def _probe_extension_kernels() -> dict[str, frozenset[str]]:
    """For each op of EXTENSION_OPS, the device types detr_fast._C has a kernel for (a build without nvcc has no
    CUDA kernels); empty sets when the extension did not load."""
    kernels = {}
    for op in EXTENSION_OPS:
        devices = set()
        if MISSING["extension"] is None:
            for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"detr_fast::{op}", key):
                    devices.add(device)
        kernels[op] = frozenset(devices)
    return kernels


# Why a component is missing (None: it is usable): "triton" and "extension".
MISSING: dict[str, str | None] = {"triton": _probe_triton(), "extension": _probe_extension()}
# Extension op -> the device types it has a kernel for.
EXTENSION_KERNELS: dict[str, frozenset[str]] = _probe_extension_kernels()


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------------------------- decisions


def use_triton(op: str, device: torch.device) -> bool:
    """Whether `op` on tensors on `device` takes its Triton kernel (True) or its reference (False)."""
    mode = current_backend()
    if mode == "reference":
        return False
    missing = MISSING["triton"]
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
        fall_back(op, missing, key="triton")
        return False
    return True


def triton_or_cpu_path(op: str, device: torch.device) -> str:
    """For an op with a Triton kernel and a CPU path of its own (PyTorch operations with a hand-written backward):
    "triton", "cpu" or "reference". CPU tensors take the CPU path unless the backend is "reference", or "kernel" with
    TRITON_INTERPRET=1 (how the tests run the kernels on the CPU); other devices decide as `use_triton`."""
    mode = current_backend()
    if mode == "reference":
        return "reference"
    if device.type == "cpu" and not (mode == "kernel" and triton_interpreted()):
        return "cpu"
    return "triton" if use_triton(op, device) else "reference"


def use_extension(op: str, device: torch.device, kernel: str) -> bool:
    """Whether `op` on tensors on `device` takes the extension's op `kernel` (True) or its reference (False).
    Meta tensors take it wherever it exists (its fake implementation serves them)."""
    if current_backend() == "reference":
        return False
    missing = MISSING["extension"]
    if missing:
        fall_back(op, missing, key="extension")
        return False
    if device.type != "meta" and device.type not in EXTENSION_KERNELS[kernel]:
        reason = f"the extension detr_fast._C has no {device.type} kernel for {op} (built without it)"
        fall_back(op, reason, key=f"extension-{kernel}-{device.type}")
        return False
    return True


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


def describe() -> str:
    """One line saying which fast paths this installation has and, for those it lacks, why."""
    parts = []
    for component in ("extension", "triton"):
        missing = MISSING[component]
        parts.append(f"{component}: {'available' if missing is None else missing}")
        if component == "extension" and missing is None:
            solver = EXTENSION_KERNELS["linear_assignment"]
            parts[-1] += f" (solver kernels: {', '.join(sorted(solver))}"
            parts[-1] += ")" if "cuda" in solver else "; built without nvcc: CUDA uses the reference solver)"
    return f"detr_fast backend {current_backend()!r}; " + "; ".join(parts)
