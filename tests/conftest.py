"""Test configuration. DETR_FAST_TEST_DEVICE=cuda runs the suite on a GPU (bench/gpu_suite.sh does); the default
is cpu, where Triton kernels run in Triton's interpreter (tests/helpers.py, imported first, sets TRITON_INTERPRET=1
before torch and triton are imported)."""

import os
import zlib

import pytest

# Before its import: pytest's assertion messages for the assert_* helpers, as for asserts in the test modules.
pytest.register_assert_rewrite("tests.helpers")

from .helpers import DEVICE  # noqa: E402  (before torch: it sets TRITON_INTERPRET)

# isort: split
import torch  # noqa: E402

try:  # hypothesis is in the [test] extra; a machine without it skips the property tests that import it
    from hypothesis import settings
except ImportError:
    pass
else:
    settings.register_profile("detr_fast", deadline=None, print_blob=True)
    settings.load_profile("detr_fast")


def pytest_report_header(config):
    return f"detr_fast test device: {DEVICE} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"


@pytest.fixture
def device() -> torch.device:
    """The device every device-parametrized test runs on."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("DETR_FAST_TEST_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _seed(request):
    """A fixed seed per test (from its name), so failures reproduce and tests do not share random streams."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """NaN-fill every tensor torch.empty / torch.empty_like allocate, so output the kernels fail to write shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))
