"""The criterion's loss terms are named entries (DETR's get_loss): the loss dict lists every layer's values in
transformers' order, the total weighs them by weight_dict, and a new term is one method and one entry."""

import pytest
import torch

from detr_fast import pad_targets
from detr_fast.loss import DetrLoss, Matched

from .helpers import random_labels

LAYERS, QUERIES, CLASSES, COUNTS = 3, 9, 5, (1, 4)


def inputs(device):
    logits = torch.randn(LAYERS, len(COUNTS), QUERIES, CLASSES + 1, device=device)
    boxes = torch.rand(LAYERS, len(COUNTS), QUERIES, 4, device=device) * 0.4 + 0.3
    return logits, boxes, pad_targets(random_labels(COUNTS, CLASSES, device))


def test_the_loss_dict_and_the_total_follow_the_named_terms(device):
    criterion = DetrLoss(CLASSES).to(device)
    loss, loss_dict, _ = criterion(*inputs(device))
    terms = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error"]
    assert list(loss_dict) == terms + [f"{t}_{i}" for i in range(LAYERS - 1) for t in terms]
    expected = sum(
        weight * loss_dict[term + suffix]
        for term, weight in criterion.weight_dict.items()
        for suffix in ["", *(f"_{i}" for i in range(LAYERS - 1))]
    )
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="unknown loss 'masks'"):
        criterion.get_loss("masks", None)


class WithMatchedQueries(DetrLoss):
    """A criterion with one more term: the number of matched queries, every layer ("matched") and of the last
    layer only ("matched_last", a scalar), weighted into the total."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.losses["matched"] = self.loss_matched
        self.weight_dict["matched_last"] = 0.5

    def loss_matched(self, m: Matched) -> dict[str, torch.Tensor]:
        per_layer = m.matched.sum((1, 2)).float()  # [L]
        return {"matched": per_layer, "matched_last": per_layer[-1]}


def test_a_new_term_is_one_method_and_one_entry(device):
    logits, boxes, targets = inputs(device)
    plain_loss, plain_dict, _ = DetrLoss(CLASSES).to(device)(logits, boxes, targets)
    loss, loss_dict, _ = WithMatchedQueries(CLASSES).to(device)(logits, boxes, targets)
    matched = sum(COUNTS)  # every target is matched in every layer (more queries than targets)
    assert list(loss_dict)[:6] == [*plain_dict][:4] + ["matched", "matched_last"]
    assert loss_dict["matched"] == loss_dict["matched_0"] == loss_dict["matched_last"] == matched
    assert "matched_last_0" not in loss_dict  # a scalar term belongs to the last layer only
    torch.testing.assert_close(loss, plain_loss + 0.5 * matched)
