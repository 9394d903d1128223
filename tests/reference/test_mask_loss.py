"""The mask-loss reference against an outside oracle: per matched pair, torchvision's sigmoid_focal_loss (RetinaNet's)
and DETR's dice loss on the F.interpolate-upsampled logits, pair by pair as DETR's loss_masks computes them."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from detr_fast import reference


def pairwise_oracle(pred, assignment, tgt, alpha, gamma):
    """DETR's loss_masks, one matched pair at a time, with torchvision's focal loss."""
    focal, dice = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for image, query in assignment.ge(0).nonzero().tolist():
        slot = assignment[image, query].item()
        logits = F.interpolate(pred[image, query][None, None], size=tgt.shape[-2:], mode="bilinear")[0, 0]
        target = tgt[image, slot].double()
        focal += sigmoid_focal_loss(logits, target, alpha, gamma, reduction="mean")
        prob = logits.sigmoid()
        dice += 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return focal, dice


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 1.5)])
def test_reference_equals_the_pairwise_oracle(alpha, gamma):
    pred = torch.randn(3, 6, 5, 7, dtype=torch.float64) * 2
    assignment = torch.tensor([[2, -1, 0, -1, 1, -1], [-1] * 6, [-1, -1, -1, 0, -1, -1]])
    tgt = torch.rand(3, 3, 21, 26) < 0.3
    tgt[2, 1:] = False  # padded slots
    got = reference.mask_loss(pred, assignment, tgt, alpha, gamma)
    want = pairwise_oracle(pred, assignment, tgt, alpha, gamma)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_slot_queries_inverts_the_assignment():
    assignment = torch.tensor([[2, -1, 0, -1], [-1, -1, -1, -1], [1, 0, -1, 3]])
    got = reference.slot_queries(assignment, 4)
    assert got.tolist() == [[2, -1, 0, -1], [-1, -1, -1, -1], [1, 0, -1, 3]]
    assert reference.slot_queries(assignment, 5)[0].tolist() == [2, -1, 0, -1, -1]


def test_no_slots_and_empty_images_give_zeros_with_a_gradient():
    pred = torch.randn(2, 4, 3, 3, requires_grad=True)
    for tgt in (torch.zeros(2, 0, 8, 8, dtype=torch.bool), torch.zeros(2, 2, 0, 8, dtype=torch.bool)):
        focal, dice = reference.mask_loss(pred, torch.full((2, 4), -1), tgt)
        assert focal.item() == 0 and dice.item() == 0
        (grad,) = torch.autograd.grad(focal + dice, pred)
        assert torch.equal(grad, torch.zeros_like(pred))
