"""Box ops of the reference against torchvision (the outside oracle)."""

import pytest
import torch
import torchvision.ops as tv

from detr_fast.reference.box_ops import center_to_corners, corners_to_center, generalized_iou, pairwise_generalized_iou


def random_xyxy(n, device, dtype=torch.float64):
    xy = torch.rand(n, 2, device=device, dtype=dtype)
    wh = torch.rand(n, 2, device=device, dtype=dtype) * 0.5 + 0.01
    return torch.cat([xy, xy + wh], -1)


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


def test_degenerate_pair_is_nan_not_an_error(device):
    point = torch.tensor([[0.3, 0.3, 0.3, 0.3]], device=device)
    assert torch.isnan(generalized_iou(point, point)).all()
