"""Backend selection: environment variable, context manager, fallbacks that say why once, and errors."""

import warnings

import pytest
import torch

import detr_fast
from detr_fast import dispatch
from detr_fast.dispatch import EXTENSION_KERNELS, MISSING, current_backend, describe, use_extension, use_triton

CPU = torch.device("cpu")


@pytest.fixture
def missing(monkeypatch):
    """Pretend triton and the extension are missing, with fresh warn-once state."""
    monkeypatch.setitem(MISSING, "triton", "triton is not importable (ImportError: test)")
    monkeypatch.setitem(MISSING, "extension", "the extension detr_fast._C is not available (test)")
    monkeypatch.setattr(dispatch, "_warned", set())


def test_environment_variable_and_context_manager(monkeypatch):
    monkeypatch.setenv("DETR_FAST_BACKEND", "reference")
    assert current_backend() == "reference"
    with detr_fast.backend("kernel"):
        assert current_backend() == "kernel"
        with detr_fast.backend("auto"):
            assert current_backend() == "auto"
        assert current_backend() == "kernel"
    assert current_backend() == "reference"
    monkeypatch.setenv("DETR_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DETR_FAST_BACKEND='fastest': expected one of auto, kernel, reference"):
        current_backend()
    with pytest.raises(ValueError, match="backend\\('gpu'\\)"):
        with detr_fast.backend("gpu"):
            pass


def test_auto_falls_back_and_says_why_once(missing, monkeypatch):
    monkeypatch.delenv("DETR_FAST_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="triton is not importable"):
        assert use_triton("detr_fast.attention", torch.device("cuda")) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second fallback for the same reason stays silent
        assert use_triton("detr_fast.box_loss", torch.device("cuda")) is False
    with pytest.warns(RuntimeWarning, match="detr_fast._C is not available"):
        assert use_extension("detr_fast.linear_assignment", CPU, "linear_assignment") is False
    assert "triton: triton is not importable" in describe()


def test_kernel_mode_raises_instead_of_falling_back(missing):
    with detr_fast.backend("kernel"):
        with pytest.raises(
            RuntimeError, match="detr_fast.attention: DETR_FAST_BACKEND=kernel but triton is not importable"
        ):
            use_triton("detr_fast.attention", torch.device("cuda"))
        with pytest.raises(RuntimeError, match="linear_assignment: DETR_FAST_BACKEND=kernel but the extension"):
            use_extension("detr_fast.linear_assignment", CPU, "linear_assignment")


def test_cpu_tensors_take_triton_only_in_kernel_mode_under_the_interpreter(monkeypatch):
    monkeypatch.setitem(MISSING, "triton", None)
    assert use_triton("op", torch.device("cpu")) is False  # auto: CPU tensors take the reference
    with detr_fast.backend("kernel"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert use_triton("op", torch.device("cpu")) is True
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
            use_triton("op", torch.device("cpu"))
    with detr_fast.backend("reference"):
        assert use_triton("op", torch.device("cuda")) is False


def test_reference_paths_work_without_fast_paths(missing):
    """The package keeps working on its references when neither triton nor the extension is there."""
    cost = torch.rand(2, 5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback notice, tested above
        assignment = detr_fast.ops.linear_assignment(cost)
    assert assignment.shape == (2, 5) and ((assignment >= 0).sum(-1) == 3).all()
    q = torch.randn(1, 4, 2, 8)
    assert detr_fast.ops.attention(q, q, q).shape == (1, 4, 2, 8)


def test_describe_lists_the_devices_the_solver_runs_on(monkeypatch):
    if MISSING["extension"] is not None:
        pytest.skip(f"the extension is not built: {MISSING['extension']}")
    assert f"solver kernels: {', '.join(sorted(EXTENSION_KERNELS['linear_assignment']))})" in describe()
    monkeypatch.setitem(EXTENSION_KERNELS, "linear_assignment", frozenset({"cpu"}))
    assert "(solver kernels: cpu; built without nvcc: CUDA uses the reference solver)" in describe()
