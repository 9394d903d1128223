"""The criterion on the kernels equals the criterion on the references: DetrLoss with DETR_FAST_BACKEND=kernel
(match_cost and box_loss in Triton, the matcher in detr_fast._C) against DETR_FAST_BACKEND=reference, loss dict and
gradients, on a small batch: 3 decoder layers, 3 images with 0, 2 and 5 targets, 17 queries, 7 classes."""

import torch

from detr_fast import backend, pad_targets
from detr_fast.kernels import box_loss as box_loss_kernels
from detr_fast.kernels import match_cost as match_cost_kernels
from detr_fast.loss import DetrLoss

from .helpers import random_labels

LAYERS, QUERIES, CLASSES, COUNTS = 3, 17, 7, (0, 2, 5)


def criterion_outputs(criterion, logits, box_logits, targets):
    """(loss, loss dict, status, d loss / d logits, d loss / d box_logits); boxes are sigmoid(box_logits)."""
    logits, box_logits = logits.detach().requires_grad_(), box_logits.detach().requires_grad_()
    loss, loss_dict, status = criterion(logits, box_logits.sigmoid(), targets)
    grads = torch.autograd.grad(loss, (logits, box_logits))
    return loss.detach(), {k: v.detach() for k, v in loss_dict.items()}, status, *grads


def random_batch(device):
    logits = torch.randn(LAYERS, len(COUNTS), QUERIES, CLASSES + 1, device=device)
    box_logits = torch.randn(LAYERS, len(COUNTS), QUERIES, 4, device=device)
    return logits, box_logits, pad_targets(random_labels(COUNTS, CLASSES, device, labels_first=True))


def test_kernel_criterion_equals_reference_criterion(device, monkeypatch):
    launches = []
    for module, name in ((match_cost_kernels, "match_cost_forward"), (box_loss_kernels, "box_loss_forward"),
                         (box_loss_kernels, "box_loss_backward")):  # fmt: skip
        launch = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, name=name, launch=launch: launches.append(name) or launch(*a))
    criterion = DetrLoss(CLASSES).to(device)
    logits, box_logits, targets = random_batch(device)

    with backend("kernel"):
        loss, loss_dict, status, grad_logits, grad_boxes = criterion_outputs(criterion, logits, box_logits, targets)
    assert launches == ["match_cost_forward", "box_loss_forward", "box_loss_backward"]
    with backend("reference"):
        want = criterion_outputs(criterion, logits, box_logits, targets)
    assert (status == 0).all() and torch.equal(status, want[2])
    assert loss_dict.keys() == want[1].keys() and len(loss_dict) == 4 * LAYERS
    for key, value in loss_dict.items():
        torch.testing.assert_close(value, want[1][key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_logits, want[3], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_boxes, want[4], rtol=1e-5, atol=1e-7)
    assert grad_boxes[:, 0].abs().max() == 0  # the image without targets has no box loss


def test_kernel_criterion_compiles_whole(device):
    """DetrLoss on the kernels traces with torch.compile(fullgraph=True): no host sync, no graph break."""
    criterion = DetrLoss(CLASSES).to(device)
    logits, box_logits, targets = random_batch(device)

    def step(logits, box_logits):
        loss, loss_dict, _ = criterion(logits, box_logits.sigmoid(), targets)
        return loss, loss_dict["loss_giou"]

    with backend("kernel"):
        eager = step(logits, box_logits)
        compiled = torch.compile(step, fullgraph=True)(logits, box_logits)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
