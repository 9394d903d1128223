"""The cost terms of DETR descendants that match_cost does not cover, against transformers' own formulas in
float64: Grounding DINO's class cost over text tokens and RF-DETR's (Mask2Former's) pair-wise mask costs on points;
and the ops' argument errors."""

import pytest
import torch

from detr_fast import ops, reference

transformers_loss = pytest.importorskip("transformers.loss.loss_rf_detr")


def test_token_class_cost_is_the_focal_cost_averaged_over_each_phrase():
    generator = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(2, 5, 6, generator=generator, dtype=torch.float64)  # [B, N, T]
    maps = torch.zeros(2, 3, 6, dtype=torch.float64)
    maps[0, 0, 1:3] = maps[0, 1, 4] = maps[0, 2, 0:6] = 1
    maps[1, 0, 2] = maps[1, 1, 3:5] = 1  # image 1: two targets, the third slot padding (an empty map)
    cost = reference.token_class_cost(logits, maps, 0.3, 1.5)  # [B, N, M]
    assert cost.shape == (2, 5, 3) and cost.dtype == torch.float64
    p = logits.sigmoid()
    per_token = 0.3 * (1 - p) ** 1.5 * -(p + 1e-8).log() - 0.7 * p**1.5 * -(1 - p + 1e-8).log()
    for b, m in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        tokens = maps[b, m].bool()
        torch.testing.assert_close(cost[b, :, m], per_token[b][:, tokens].mean(-1), rtol=1e-12, atol=1e-12)
    assert cost[1, :, 2].isnan().all()  # an empty phrase: 0 / 0, masked by the caller as a padded column
    torch.testing.assert_close(ops.token_class_cost(logits, maps, 0.3, 1.5), cost, rtol=0, atol=0, equal_nan=True)


def test_mask_point_cost_equals_transformers_pair_wise_costs():
    generator = torch.Generator().manual_seed(1)
    pred = 3 * torch.randn(2, 4, 11, generator=generator, dtype=torch.float64)  # [B, N, P] logits
    target = (torch.rand(2, 3, 11, generator=generator) > 0.5).double()  # [B, M, P]
    cross_entropy, dice = ops.mask_point_cost(pred, target)
    for b in range(2):
        expected_ce = transformers_loss.pair_wise_sigmoid_cross_entropy_loss(pred[b], target[b])
        expected_dice = transformers_loss.pair_wise_dice_loss(pred[b], target[b])
        torch.testing.assert_close(cross_entropy[b], expected_ce, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dice[b], expected_dice, rtol=1e-12, atol=1e-12)
    float32 = ops.mask_point_cost(pred.float(), target.float())
    assert all(t.dtype == torch.float32 for t in float32)
    torch.testing.assert_close(float32[0].double(), cross_entropy, rtol=1e-5, atol=1e-6)


def test_bad_arguments_name_the_op_and_the_argument():
    with pytest.raises(ValueError, match=r"detr_fast.token_class_cost: label_maps has shape \(2, 3, 5\); expected"):
        ops.token_class_cost(torch.zeros(2, 4, 6), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"detr_fast.mask_point_cost: tgt_points has shape \(3, 3, 7\); expected"):
        ops.mask_point_cost(torch.zeros(2, 4, 7), torch.zeros(3, 3, 7))
    with pytest.raises(TypeError, match="detr_fast.mask_point_cost: pred_points"):
        ops.mask_point_cost([[0.0]], torch.zeros(1, 1, 1))
