"""The fused CPU twin of match_cost in detr_fast._C (csrc/match_cost_cpu.cpp) against the fp64 reference.

CPU tensors take it under the auto backend when the extension is built; it runs on the CPU whatever the test
device, so the GPU suite checks it too.
"""

import pytest
import torch

from detr_fast import backend, ops, reference
from detr_fast.dispatch import EXTENSION_KERNELS

from ..helpers import MATCH_COST_SHAPES, assert_real_columns_within, random_cxcywh, random_problem

pytestmark = pytest.mark.skipif(
    "cpu" not in EXTENSION_KERNELS["match_cost_cpu"], reason="detr_fast._C is not built with match_cost_cpu"
)
CPU = torch.device("cpu")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]  # half inputs are costed in float32


def twin(*args, **kwargs):
    with backend("auto"):
        return ops.match_cost(*args, **kwargs)


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("focal", [False, True], ids=["softmax", "focal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leading,queries,counts,classes", MATCH_COST_SHAPES)
def test_matches_fp64_reference(dtype, leading, queries, counts, classes, focal):
    logits, pred, labels, boxes, mask = random_problem(leading, queries, counts, classes, CPU, dtype, focal)
    boxes = boxes.to(dtype)
    got = twin(logits, pred, labels, boxes, mask, 1.0, 5.0, 2.0, focal=focal)
    lowp = reference.match_cost(logits, pred, labels, boxes, mask, 1.0, 5.0, 2.0, focal=focal)
    exact = reference.match_cost(
        logits.double(), pred.double(), labels, boxes.double(), mask, 1.0, 5.0, 2.0, focal=focal
    )
    assert_real_columns_within(got, lowp, exact, mask)


@pytest.mark.parametrize("focal", [False, True], ids=["softmax", "focal"])
def test_degenerate_nan_and_out_of_range_labels_follow_the_reference(focal):
    logits, pred, labels, boxes, mask = random_problem((2,), 7, [4, 3], 5, CPU, torch.float64, focal)
    pred[0, 0, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)  # a point
    boxes[0, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)  # the same point: GIoU 0 by definition
    boxes[0, 1] = torch.tensor([0.2, 0.2, 0.0, 0.1], dtype=torch.float64)  # zero width
    pred[1, 1, 2, 1] = float("nan")
    labels[1, 0] = 6  # outside [0, C+1): NaN cost
    labels[1, 2] = -1
    labels[1, 3] = 1000  # a padded slot: +inf whatever its label
    got = twin(logits, pred, labels, boxes, mask, focal=focal)
    exact = reference.match_cost(logits, pred, labels, boxes, mask, focal=focal)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-12, equal_nan=True)
    assert torch.isnan(got[:, 1, :, 0]).all() and torch.isfinite(got[0, 0, 0, :4]).all()
    assert (got[:, 1, :, 3] == float("inf")).all()


@pytest.mark.parametrize("focal", [False, True], ids=["softmax", "focal"])
def test_padding_anywhere_in_the_slots(focal):
    """Padded slots between and before real ones (the twin skips the box terms only after an image's last real
    target), an image of padding only."""
    logits, pred, labels, boxes, mask = random_problem((2,), 9, [6, 6, 6], 5, CPU, torch.float32, focal)
    mask[0, 1] = mask[0, 4] = False
    mask[1, :3] = False
    mask[2] = False
    got = twin(logits, pred, labels, boxes, mask, focal=focal)
    torch.testing.assert_close(got, reference.match_cost(logits, pred, labels, boxes, mask, focal=focal))
    assert (got[..., 2, :, :] == float("inf")).all() and got[..., 1, :, 3:].isfinite().all()


@pytest.mark.parametrize("focal", [False, True], ids=["softmax", "focal"])
def test_large_batch_against_float32_reference(focal):
    logits, pred, labels, boxes, mask = random_problem((6,), 100, [29, 1, 17, 0] * 8, 91, CPU, torch.float32, focal)
    with backend("reference"):
        expected = ops.match_cost(logits, pred, labels, boxes, mask, focal=focal)
    got = twin(logits, pred, labels, boxes, mask, focal=focal)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("focal", [False, True], ids=["softmax", "focal"])
def test_opcheck_and_compile(focal):
    logits, pred, labels, boxes, mask = random_problem((2,), 9, [3, 2], 4, CPU, torch.float32, focal)
    table = -logits.softmax(-1)  # [2, B, N, K]: the class costs the twin reads
    args = (table, pred, labels, boxes, mask, 1.0, 5.0, 2.0)
    torch.library.opcheck(torch.ops.detr_fast.match_cost_cpu.default, args)
    compiled = torch.compile(lambda *a: twin(*a, focal=focal), fullgraph=True, backend="aot_eager")
    want = twin(logits, pred, labels, boxes, mask, focal=focal)
    torch.testing.assert_close(compiled(logits, pred, labels, boxes, mask), want)


def test_empty_shapes():
    logits = torch.randn(3, 0, 5)
    got = twin(
        logits,
        torch.rand(3, 0, 4),
        torch.zeros(3, 2, dtype=torch.long),
        random_cxcywh(3, 2, device=CPU),
        torch.ones(3, 2, dtype=torch.bool),
    )
    assert got.shape == (3, 0, 2)
