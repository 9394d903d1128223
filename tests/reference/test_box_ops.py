"""Box ops of the reference against torchvision (the outside oracle)."""

import pytest
import torch
import torchvision.ops as tv

from detr_fast.reference.box_ops import center_to_corners, corners_to_center, generalized_iou, pairwise_generalized_iou

from ..helpers import random_cxcywh


def random_xyxy(n, device, dtype=torch.float64):
    """Boxes (x0, y0, x1, y1): the top-left corner U(0, 1) and the size U(0.01, 0.51), drawn by random_cxcywh."""
    corner, size = random_cxcywh(
        n, device=device, dtype=dtype, center_low=0.0, center_width=1.0, size_low=0.01, size_width=0.5
    ).split(2, -1)
    return torch.cat([corner, corner + size], -1)


def test_conversions_match_torchvision(device):
    boxes = torch.rand(37, 4, device=device, dtype=torch.float64)
    assert torch.allclose(center_to_corners(boxes), tv.box_convert(boxes, "cxcywh", "xyxy"))
    assert torch.allclose(corners_to_center(center_to_corners(boxes)), boxes)


@pytest.mark.parametrize("n,m", [(1, 1), (17, 9), (100, 31)])
def test_pairwise_giou_matches_torchvision(device, n, m):
    a, b = random_xyxy(n, device), random_xyxy(m, device)
    ours = pairwise_generalized_iou(a, b)
    assert ours.shape == (n, m)
    torch.testing.assert_close(ours, tv.generalized_box_iou(a, b), rtol=1e-12, atol=1e-12)


def test_batched_giou_is_per_batch(device):
    a, b = random_xyxy(6 * 5, device).view(2, 3, 5, 4), random_xyxy(3 * 7, device).view(3, 7, 4)
    ours = pairwise_generalized_iou(a, b)  # [2, 3, 5, 7]
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(ours[i, j], tv.generalized_box_iou(a[i, j], b[j]), rtol=1e-12, atol=1e-12)


def test_elementwise_giou_is_the_diagonal(device):
    a, b = random_xyxy(23, device), random_xyxy(23, device)
    torch.testing.assert_close(generalized_iou(a, b), tv.generalized_box_iou(a, b).diagonal())


def test_identical_touching_and_nested_boxes(device):
    box = torch.tensor([[0.1, 0.1, 0.4, 0.5]], device=device, dtype=torch.float64)
    assert generalized_iou(box, box).item() == 1.0
    touching = torch.tensor([[0.4, 0.1, 0.6, 0.5]], device=device, dtype=torch.float64)  # shares the edge x = 0.4
    assert generalized_iou(box, touching).item() == pytest.approx(0.0)  # no overlap, hull = union
    inner = torch.tensor([[0.2, 0.2, 0.3, 0.3]], device=device, dtype=torch.float64)
    assert generalized_iou(box, inner).item() == pytest.approx(0.01 / 0.12)


def xyxy(box, device, dtype=torch.float64, requires_grad=False):
    return torch.tensor(box, device=device, dtype=dtype, requires_grad=requires_grad)


def test_degenerate_pairs_have_the_defined_giou(device):
    """IoU := 0 for a zero union, hull term := 0 for a zero hull; a degenerate box against a valid one is unchanged."""
    point = xyxy([0.25, 0.25, 0.25, 0.25], device=device)
    other_point = xyxy([0.75, 0.5, 0.75, 0.5], device=device)
    same_row_point = xyxy([0.75, 0.25, 0.75, 0.25], device=device)
    segment = xyxy([0.5, 0.25, 0.5, 0.75], device=device)  # zero width, inside `valid`
    valid = xyxy([0.0, 0.0, 1.0, 1.0], device=device)
    assert generalized_iou(point, point).item() == 0.0  # zero union, zero hull
    assert generalized_iou(point, other_point).item() == -1.0  # zero union, hull 0.125
    assert generalized_iou(point, same_row_point).item() == 0.0  # zero union, zero hull (a segment)
    assert generalized_iou(segment, valid).item() == 0.0  # inter 0, union = hull = 1: the plain formula
    outside = xyxy([1.5, 0.0, 1.5, 1.0], device=device)  # zero width, to the right of `valid`
    assert generalized_iou(outside, valid).item() == pytest.approx(-(1.5 - 1.0) / 1.5)


def test_degenerate_and_inverted_boxes_give_finite_values_and_gradients(device):
    corners = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], device=device, dtype=torch.float64)
    boxes1 = corners[torch.randint(0, 5, (500, 4), device=device)].requires_grad_()  # many with x1 <= x0 or y1 <= y0
    boxes2 = corners[torch.randint(0, 5, (500, 4), device=device)].requires_grad_()
    giou = generalized_iou(boxes1, boxes2)
    assert torch.isfinite(giou).all()
    giou.sum().backward()
    assert torch.isfinite(boxes1.grad).all() and torch.isfinite(boxes2.grad).all()
    valid = (boxes1[:, 2:] > boxes1[:, :2]).all(-1) & (boxes2[:, 2:] > boxes2[:, :2]).all(-1)
    expected = tv.generalized_box_iou(boxes1[valid].detach(), boxes2[valid].detach()).diagonal()
    torch.testing.assert_close(giou[valid].detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("coordinate", range(4))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_propagate(device, coordinate, value):
    box = xyxy([0.25, 0.25, 0.75, 0.5], device=device)
    bad = box.clone()
    bad[coordinate] = value
    for giou in (generalized_iou(bad, box), generalized_iou(box, bad)):
        assert torch.isnan(giou) if value != value else not torch.isfinite(giou)


def test_touching_boxes_pass_the_gradient_through_the_zero_clamp(device):
    """Boxes sharing the edge x = 0.5: the intersection width is exactly 0 and its clamp passes the gradient, so
    d GIoU / d x1 = inter_h (1/union - 1/hull) + h1 / hull = 0.5 (1/0.75 - 1) + 0.5 = 2/3 (a blocked clamp: 1/2)."""
    box1 = xyxy([0.0, 0.0, 0.5, 0.5], device=device, requires_grad=True)
    box2 = xyxy([0.5, 0.0, 1.0, 1.0], device=device)
    giou = generalized_iou(box1, box2)
    assert giou.item() == pytest.approx(0.75 - 1.0)
    giou.backward()
    assert box1.grad[2].item() == pytest.approx(2 / 3, rel=1e-12)


def test_shared_edges_split_the_gradient_half_half(device):
    """A box nested in the corner of another shares x0 and y0: torch.maximum/minimum ties give each box half the
    gradient, so d GIoU / d x0 is exactly 1/16 for the inner box and -5/16 for the outer one (without the split:
    1/2 and 1/8)."""
    inner = xyxy([0.0, 0.0, 0.5, 0.5], device=device, requires_grad=True)
    outer = xyxy([0.0, 0.0, 1.0, 1.0], device=device, requires_grad=True)
    giou = generalized_iou(inner, outer)
    assert giou.item() == 0.25
    giou.backward()
    assert inner.grad[0].item() == 0.0625
    assert outer.grad[0].item() == -0.3125
