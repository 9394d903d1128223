"""The reference matching cost against transformers' HungarianMatcher on the unpadded blocks."""

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.transformers
from transformers.image_transforms import center_to_corners_format  # noqa: E402
from transformers.loss.loss_for_object_detection import HungarianMatcher, generalized_box_iou  # noqa: E402

from detr_fast import pad_targets  # noqa: E402
from detr_fast.loss import hungarian_match  # noqa: E402
from detr_fast.reference import match_cost  # noqa: E402

from ..helpers import random_cxcywh, random_labels  # noqa: E402

# Predicted boxes: every coordinate U(0.1, 0.6).
PRED_BOX_RANGES = dict(center_low=0.1, center_width=0.5, size_low=0.1, size_width=0.5)


def transformers_cost(logits, boxes, targets, class_w, bbox_w, giou_w, focal=False):
    """transformers' matcher cost, [B*N, sum M], as its forward builds it before the scipy call: HungarianMatcher's
    (softmax), or DeformableDetrHungarianMatcher's (focal, alpha 0.25, gamma 2)."""
    out_bbox = boxes.flatten(0, 1)
    ids = torch.cat([t["class_labels"] for t in targets])
    tgt = torch.cat([t["boxes"] for t in targets])
    if focal:
        prob = logits.flatten(0, 1).sigmoid()
        neg = (1 - 0.25) * (prob**2.0) * (-(1 - prob + 1e-8).log())
        pos = 0.25 * ((1 - prob) ** 2.0) * (-(prob + 1e-8).log())
        class_cost = pos[:, ids] - neg[:, ids]
    else:
        class_cost = -logits.flatten(0, 1).softmax(-1)[:, ids]
    giou = generalized_box_iou(center_to_corners_format(out_bbox), center_to_corners_format(tgt))
    return bbox_w * torch.cdist(out_bbox, tgt, p=1) + class_w * class_cost + giou_w * -giou


@pytest.mark.parametrize("batch,queries,classes,counts", [(2, 17, 5, [9, 4]), (3, 100, 92, [31, 0, 12])])
def test_cost_equals_transformers_blocks(device, batch, queries, classes, counts):
    logits = torch.randn(batch, queries, classes + 1, device=device)
    boxes = random_cxcywh(batch, queries, device=device, **PRED_BOX_RANGES)
    targets = random_labels(counts, classes, device)
    padded = pad_targets(targets)
    ours = match_cost(logits, boxes, padded["class_labels"], padded["boxes"], padded["mask"], 1.0, 5.0, 2.0)
    assert ours.shape == (batch, queries, max(counts))
    theirs = transformers_cost(logits, boxes, targets, 1.0, 5.0, 2.0).view(batch, queries, -1)
    start = 0
    for b, m in enumerate(counts):
        torch.testing.assert_close(ours[b, :, :m], theirs[b, :, start : start + m], rtol=1e-6, atol=1e-6)
        assert torch.isinf(ours[b, :, m:]).all() and (ours[b, :, m:] > 0).all()
        start += m


@pytest.mark.parametrize("focal", [False, True], ids=["softmax", "focal"])
def test_cost_with_weights_equals_transformers_blocks(device, focal):
    """Non-default cost weights, and the focal class cost against DeformableDetrHungarianMatcher's formula."""
    counts = [9, 4, 0]
    classes = 7
    logits = torch.randn(3, 17, classes if focal else classes + 1, device=device)
    boxes = random_cxcywh(3, 17, device=device, **PRED_BOX_RANGES)
    targets = random_labels(counts, classes, device)
    padded = pad_targets(targets)
    labels, tgt_boxes, mask = padded["class_labels"], padded["boxes"], padded["mask"]
    ours = match_cost(logits, boxes, labels, tgt_boxes, mask, 2.0, 3.0, 0.5, focal=focal)
    theirs = transformers_cost(logits, boxes, targets, 2.0, 3.0, 0.5, focal=focal).view(3, 17, -1)
    start = 0
    for b, m in enumerate(counts):
        torch.testing.assert_close(ours[b, :, :m], theirs[b, :, start : start + m], rtol=1e-6, atol=1e-6)
        assert (ours[b, :, m:] == float("inf")).all()
        start += m


def test_focal_alpha_and_gamma(device):
    logits = torch.randn(2, 5, 4, device=device, dtype=torch.float64)
    boxes = random_cxcywh(2, 5, device=device, dtype=torch.float64, **PRED_BOX_RANGES)
    labels = torch.tensor([[0, 3], [2, 1]], device=device)
    mask = torch.ones(2, 2, dtype=torch.bool, device=device)
    prob = logits.sigmoid().gather(-1, labels[:, None, :].expand(2, 5, 2))  # [B, N, M]
    for alpha, gamma in [(0.5, 0.0), (0.3, 1.5)]:
        cost = match_cost(
            logits, boxes, labels, boxes[:, :2], mask, 1.0, 0.0, 0.0, focal=True, focal_alpha=alpha, focal_gamma=gamma
        )
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        torch.testing.assert_close(cost, pos - neg, rtol=1e-12, atol=1e-12)


def test_labels_out_of_range_cost_nan_and_padding_stays_inf(device):
    logits = torch.randn(2, 5, 4, device=device)
    boxes = random_cxcywh(2, 5, device=device, **PRED_BOX_RANGES)
    labels = torch.tensor([[-1, 4, 3], [7, 0, -5]], device=device)  # 4 classes: 0..3 valid
    mask = torch.tensor([[True, True, True], [False, True, False]], device=device)
    cost = match_cost(logits, boxes, labels, random_cxcywh(2, 3, device=device, **PRED_BOX_RANGES), mask)
    assert cost[0, :, :2].isnan().all() and cost[0, :, 2].isfinite().all()
    assert (cost[1, :, [0, 2]] == float("inf")).all() and cost[1, :, 1].isfinite().all()


def test_degenerate_boxes_give_finite_costs(device):
    logits = torch.randn(1, 6, 3, device=device)
    pred = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.2], [0.2, 0.3, 0.4, 0.0], [0.5, 0.5, -0.1, 0.2],
                          [0.5, 0.5, 0.2, 0.2], [0.25, 0.75, 0.0, 0.0]]], device=device)  # fmt: skip
    labels = torch.zeros(1, 6, dtype=torch.int64, device=device)
    cost = match_cost(logits, pred, labels, pred, torch.ones(1, 6, dtype=torch.bool, device=device))
    assert cost.isfinite().all()


def test_leading_layer_dim_costs_each_layer(device):
    logits = torch.randn(6, 2, 11, 8, device=device)
    boxes = random_cxcywh(6, 2, 11, device=device, **PRED_BOX_RANGES)
    padded = pad_targets(random_labels([3, 5], 7, device))
    all_layers = match_cost(logits, boxes, padded["class_labels"], padded["boxes"], padded["mask"])
    for layer in range(6):
        one = match_cost(logits[layer], boxes[layer], padded["class_labels"], padded["boxes"], padded["mask"])
        torch.testing.assert_close(all_layers[layer], one, rtol=0, atol=0)


def test_matching_equals_transformers_matcher(device):
    logits = torch.randn(4, 30, 11, device=device)
    boxes = random_cxcywh(4, 30, device=device, **PRED_BOX_RANGES)
    targets = random_labels([7, 0, 30, 2], 10, device)
    theirs = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)({"logits": logits, "pred_boxes": boxes}, targets)
    assignment, status = hungarian_match(logits, boxes, pad_targets(targets), 1, 5, 2)
    assert (status == 0).all()
    for b, (rows, cols) in enumerate(theirs):
        expected = torch.full((30,), -1, dtype=torch.int64)
        expected[rows] = cols
        assert torch.equal(assignment[b].cpu(), expected)
