"""Reference of `match_cost`: DETR's Hungarian matching cost per image on padded targets."""

import torch

from .box_ops import center_to_corners, pairwise_generalized_iou

FOCAL_EPS = 1e-8  # Deformable-DETR's epsilon inside the focal cost's logarithms


def class_cost(
    logits: torch.Tensor, tgt_labels: torch.Tensor, focal: bool, focal_alpha: float, focal_gamma: float
) -> torch.Tensor:
    """The class term of the cost for every query and target label.

    softmax: -softmax(logits)[label] (DETR). focal: the focal-loss cost of Deformable-DETR/DINO on sigmoid
    probabilities p, alpha (1-p)^gamma (-log(p + eps)) - (1-alpha) p^gamma (-log(1 - p + eps)) at p = p[label].
    A label outside [0, num_logits) gives NaN (nothing is checked on the host; padded columns are masked later).

    Args:
        logits: [..., B, N, K] (K = C+1 for softmax, C for focal), any float dtype.
        tgt_labels: [B, M] int64.
    Returns:
        [..., B, N, M] in float32 (float64 for float64 logits).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    num_logits = logits.shape[-1]
    if focal:
        prob = logits.sigmoid()
        neg = (1 - focal_alpha) * (prob**focal_gamma) * (-(1 - prob + FOCAL_EPS).log())
        pos = focal_alpha * ((1 - prob) ** focal_gamma) * (-(prob + FOCAL_EPS).log())
        per_class = pos - neg  # [..., B, N, K]
    else:
        per_class = -logits.softmax(-1)  # [..., B, N, K]
    label_ok = (tgt_labels >= 0) & (tgt_labels < num_logits)  # [B, M]
    index = tgt_labels.clamp(0, num_logits - 1)[:, None, :].expand(*per_class.shape[:-1], tgt_labels.shape[-1])
    cost = per_class.gather(-1, index)  # [..., B, N, M]
    return torch.where(label_ok[:, None, :], cost, float("nan"))


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
    focal: bool = False,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """The matching cost of every query against every target of its own image.

    cost = bbox_w * L1(pred, tgt) + class_w * class_cost + giou_w * -GIoU(pred, tgt), the terms in transformers'
    order, computed in float32 (float64 inputs stay float64). class_cost is -softmax(logits)[label] (DETR), or with
    focal=True the focal cost of Deformable-DETR/DINO (see `class_cost`). GIoU follows reference.box_ops (finite
    for degenerate boxes); NaN inputs give NaN costs; a real target with a label outside [0, num_logits) costs NaN.

    Args:
        logits: [..., B, N, C+1] class logits ([..., B, N, C] with focal); any leading dims (decoder layers) are
            costed together.
        pred_boxes: [..., B, N, 4] cxcywh.
        tgt_labels: [B, M] int64 class indices (padded entries may hold anything).
        tgt_boxes: [B, M, 4] cxcywh.
        tgt_mask: [B, M] bool, True for real targets.
    Returns:
        [..., B, N, M]; padded target columns are +inf.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    classes = class_cost(logits, tgt_labels, focal, focal_alpha, focal_gamma)  # [..., B, N, M]
    pred = pred_boxes.to(dtype)  # [..., B, N, 4]
    tgt = tgt_boxes.to(dtype)  # [B, M, 4]
    bbox_cost = (pred[..., :, None, :] - tgt[:, None, :, :]).abs().sum(-1)  # [..., B, N, M]
    giou_cost = -pairwise_generalized_iou(center_to_corners(pred), center_to_corners(tgt))
    cost = bbox_w * bbox_cost + class_w * classes + giou_w * giou_cost
    return cost.masked_fill(~tgt_mask[:, None, :], float("inf"))
