"""The reference matching cost against transformers' HungarianMatcher on the unpadded blocks."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers.image_transforms import center_to_corners_format  # noqa: E402
from transformers.loss.loss_for_object_detection import HungarianMatcher, generalized_box_iou  # noqa: E402

from detr_fast import pad_targets  # noqa: E402
from detr_fast.loss import hungarian_match  # noqa: E402
from detr_fast.reference import match_cost  # noqa: E402


def random_targets(counts, num_classes, device):
    targets = []
    for m in counts:
        cxcy = torch.rand(m, 2, device=device) * 0.6 + 0.2
        wh = torch.rand(m, 2, device=device) * 0.3 + 0.05
        targets.append({"class_labels": torch.randint(0, num_classes, (m,), device=device), "boxes": torch.cat([cxcy, wh], -1)})
    return targets


def transformers_cost(logits, boxes, targets, class_w, bbox_w, giou_w):
    """transformers' matcher cost, [B*N, sum M], as its forward builds it before the scipy call."""
    prob = logits.flatten(0, 1).softmax(-1)
    out_bbox = boxes.flatten(0, 1)
    ids = torch.cat([t["class_labels"] for t in targets])
    tgt = torch.cat([t["boxes"] for t in targets])
    giou = generalized_box_iou(center_to_corners_format(out_bbox), center_to_corners_format(tgt))
    return bbox_w * torch.cdist(out_bbox, tgt, p=1) + class_w * -prob[:, ids] + giou_w * -giou


@pytest.mark.parametrize("batch,queries,classes,counts", [(2, 17, 5, [9, 4]), (3, 100, 92, [31, 0, 12])])
def test_cost_equals_transformers_blocks(device, batch, queries, classes, counts):
    logits = torch.randn(batch, queries, classes + 1, device=device)
    boxes = torch.rand(batch, queries, 4, device=device) * 0.5 + 0.1
    targets = random_targets(counts, classes, device)
    padded = pad_targets(targets)
    ours = match_cost(logits, boxes, padded["class_labels"], padded["boxes"], padded["mask"], 1.0, 5.0, 2.0)
    assert ours.shape == (batch, queries, max(counts))
    theirs = transformers_cost(logits, boxes, targets, 1.0, 5.0, 2.0).view(batch, queries, -1)
    start = 0
    for b, m in enumerate(counts):
        torch.testing.assert_close(ours[b, :, :m], theirs[b, :, start:start + m], rtol=1e-6, atol=1e-6)
        assert torch.isinf(ours[b, :, m:]).all() and (ours[b, :, m:] > 0).all()
        start += m


def test_leading_layer_dim_costs_each_layer(device):
    logits = torch.randn(6, 2, 11, 8, device=device)
    boxes = torch.rand(6, 2, 11, 4, device=device) * 0.5 + 0.1
    padded = pad_targets(random_targets([3, 5], 7, device))
    all_layers = match_cost(logits, boxes, padded["class_labels"], padded["boxes"], padded["mask"])
    for layer in range(6):
        one = match_cost(logits[layer], boxes[layer], padded["class_labels"], padded["boxes"], padded["mask"])
        torch.testing.assert_close(all_layers[layer], one, rtol=0, atol=0)


def test_matching_equals_transformers_matcher(device):
    logits = torch.randn(4, 30, 11, device=device)
    boxes = torch.rand(4, 30, 4, device=device) * 0.5 + 0.1
    targets = random_targets([7, 0, 30, 2], 10, device)
    theirs = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)({"logits": logits, "pred_boxes": boxes}, targets)
    assignment, status = hungarian_match(logits, boxes, pad_targets(targets), 1, 5, 2)
    assert (status == 0).all()
    for b, (rows, cols) in enumerate(theirs):
        expected = torch.full((30,), -1, dtype=torch.int64)
        expected[rows] = cols
        assert torch.equal(assignment[b].cpu(), expected)
