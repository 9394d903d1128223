"""The reference box loss: gradcheck in float64 and agreement with torchvision's losses."""

import torch
import torchvision.ops as tv

from detr_fast.reference import box_loss
from detr_fast.reference.box_ops import center_to_corners

from ..helpers import random_cxcywh


def test_matches_torchvision_losses(device):
    pred = random_cxcywh(3, 17, device=device, dtype=torch.float64)
    tgt = random_cxcywh(3, 17, device=device, dtype=torch.float64)
    weight = (torch.rand(3, 17, device=device) > 0.4).double()
    l1, giou = box_loss(pred, tgt, weight)
    assert l1.shape == giou.shape == (3,)
    expected_l1 = (torch.nn.functional.l1_loss(pred, tgt, reduction="none").sum(-1) * weight).sum(-1)
    giou_loss = tv.generalized_box_iou_loss(center_to_corners(pred), center_to_corners(tgt), eps=0.0)
    expected_giou = (giou_loss * weight).sum(-1)
    torch.testing.assert_close(l1, expected_l1)
    torch.testing.assert_close(giou, expected_giou)


def test_gradcheck_float64(device):
    pred = random_cxcywh(2, 9, device=device, dtype=torch.float64).requires_grad_()
    tgt = random_cxcywh(2, 9, device=device, dtype=torch.float64).requires_grad_()
    weight = torch.rand(2, 9, device=device, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p, t: box_loss(p, t, weight), (pred, tgt))


def test_zero_weight_pairs_contribute_nothing(device):
    pred = random_cxcywh(5, device=device, dtype=torch.float64).requires_grad_()
    tgt = random_cxcywh(5, device=device, dtype=torch.float64)
    weight = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], device=device, dtype=torch.float64)
    l1, giou = box_loss(pred, tgt, weight)
    (l1 + giou).backward()
    assert (pred.grad[weight == 0] == 0).all()
    assert (pred.grad[weight == 1] != 0).any(dim=-1).all()


def test_low_precision_inputs_compute_in_float32(device):
    pred = random_cxcywh(8, device=device, dtype=torch.float64)
    tgt = random_cxcywh(8, device=device, dtype=torch.float64)
    weight = torch.ones(8, device=device)
    l1, giou = box_loss(pred.half(), tgt.half(), weight.half())
    assert l1.dtype == giou.dtype == torch.float32
    l1_ref, giou_ref = box_loss(pred.half().double(), tgt.half().double(), weight.double())
    torch.testing.assert_close(l1.double(), l1_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(giou.double(), giou_ref, rtol=1e-6, atol=1e-6)


def test_degenerate_boxes_give_finite_losses_and_gradients(device):
    point = torch.tensor([0.5, 0.5, 0.0, 0.0], device=device, dtype=torch.float64)
    pred = torch.stack([point, point, torch.tensor([0.5, 0.5, 0.0, 0.25], device=device, dtype=torch.float64)])
    tgt = torch.stack([point, point + torch.tensor([0.25, 0.25, 0.0, 0.0], device=device, dtype=torch.float64), point])
    pred.requires_grad_()
    l1, giou = box_loss(pred, tgt, torch.ones(3, device=device, dtype=torch.float64))
    # identical points: GIoU 0 (loss 1); distinct points: GIoU -1 (loss 2); a segment through a point: GIoU 0 (loss 1)
    assert l1.item() == 0.75 and giou.item() == 4.0
    (l1 + giou).backward()
    assert torch.isfinite(pred.grad).all()


def test_nan_box_makes_the_sums_nan_and_leaves_other_gradients_alone(device):
    pred = random_cxcywh(6, device=device, dtype=torch.float64)
    tgt = random_cxcywh(6, device=device, dtype=torch.float64)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0], device=device, dtype=torch.float64)
    clean = pred.clone().requires_grad_()
    l1, giou = box_loss(clean, tgt, weight)
    (l1 + giou).backward()
    poisoned = pred.clone()
    poisoned[4, 2] = float("nan")  # an unmatched pair: 0 * NaN is still NaN
    poisoned.requires_grad_()
    l1_nan, giou_nan = box_loss(poisoned, tgt, weight)
    assert l1_nan.isnan() and giou_nan.isnan()
    (l1_nan + giou_nan).backward()
    keep = torch.arange(6, device=device) != 4
    torch.testing.assert_close(poisoned.grad[keep], clean.grad[keep], rtol=0, atol=0)
