"""Reference of `box_loss`: DETR's L1 and GIoU box losses summed over weighted (matched) pairs."""

import torch

from .box_ops import center_to_corners, generalized_iou


def box_loss(
    pred_boxes: torch.Tensor, tgt_boxes: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 and GIoU losses of corresponding boxes, weighted and summed over the pair dimension.

    Fixed shapes: every query is a pair, unmatched ones get weight 0. Degenerate boxes (w or h <= 0) give finite
    losses and gradients (GIoU as defined in reference.box_ops). NaN or infinite coordinates are not masked: they
    make their pair's terms NaN, hence the sums NaN even at weight 0 (0 * NaN is NaN), while the other pairs'
    gradients stay unaffected.

    Args:
        pred_boxes: [..., K, 4] cxcywh, any float dtype (math in float32; float64 stays float64).
        tgt_boxes: [..., K, 4] cxcywh.
        weight: [..., K] weight of each pair (1 matched, 0 unmatched), float or bool.
    Returns:
        (l1, giou): [...] each, sum over K of weight * |pred - tgt|_1 and of weight * (1 - GIoU(pred, tgt)).
    """
    dtype = torch.promote_types(pred_boxes.dtype, torch.float32)
    pred = pred_boxes.to(dtype)
    tgt = tgt_boxes.to(dtype)
    weight = weight.to(dtype)
    l1 = ((pred - tgt).abs().sum(-1) * weight).sum(-1)
    giou = ((1 - generalized_iou(center_to_corners(pred), center_to_corners(tgt))) * weight).sum(-1)
    return l1, giou
