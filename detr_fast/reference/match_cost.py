"""Reference of `match_cost`: DETR's Hungarian matching cost per image on padded targets."""

import torch

from .box_ops import center_to_corners, pairwise_generalized_iou


@torch.no_grad()
def match_cost(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    tgt_labels: torch.Tensor,
    tgt_boxes: torch.Tensor,
    tgt_mask: torch.Tensor,
    class_w: float = 1.0,
    bbox_w: float = 5.0,
    giou_w: float = 2.0,
) -> torch.Tensor:
    """The matching cost of every query against every target of its own image.

    cost = bbox_w * L1(pred, tgt) + class_w * -softmax(logits)[label] + giou_w * -GIoU(pred, tgt), the terms in
    transformers' order, computed in float32 (float64 inputs stay float64).

    Args:
        logits: [..., B, N, C+1] class logits; any leading dims (decoder layers) are costed together.
        pred_boxes: [..., B, N, 4] cxcywh.
        tgt_labels: [B, M] int64 class indices (padded entries may hold any valid index).
        tgt_boxes: [B, M, 4] cxcywh.
        tgt_mask: [B, M] bool, True for real targets.
    Returns:
        [..., B, N, M]; padded target columns are +inf.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    prob = logits.to(dtype).softmax(-1)  # [..., B, N, C+1]
    index = tgt_labels[:, None, :].expand(*prob.shape[:-1], tgt_labels.shape[-1])  # [..., B, N, M]
    class_cost = -prob.gather(-1, index)
    pred = pred_boxes.to(dtype)  # [..., B, N, 4]
    tgt = tgt_boxes.to(dtype)  # [B, M, 4]
    bbox_cost = (pred[..., :, None, :] - tgt[:, None, :, :]).abs().sum(-1)  # [..., B, N, M]
    giou_cost = -pairwise_generalized_iou(center_to_corners(pred), center_to_corners(tgt))
    cost = bbox_w * bbox_cost + class_w * class_cost + giou_w * giou_cost
    return cost.masked_fill(~tgt_mask[:, None, :], float("inf"))
