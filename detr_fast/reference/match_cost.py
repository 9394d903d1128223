"""Reference of `match_cost`: DETR's Hungarian matching cost per image on padded targets."""

import torch
import torch.nn.functional as F

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
    num_logits = logits.shape[-1]
    label_ok = (tgt_labels >= 0) & (tgt_labels < num_logits)  # [B, M]
    index = tgt_labels.clamp(0, num_logits - 1)[:, None, :].expand(*logits.shape[:-1], tgt_labels.shape[-1])
    if focal:  # elementwise in the logit: taken at the labels first, computed for M targets instead of K classes
        cost = focal_class_costs(logits.gather(-1, index), focal_alpha, focal_gamma)  # [..., B, N, M]
    else:
        probabilities = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)  # [..., B, N, K]
        cost = -probabilities.gather(-1, index)  # [..., B, N, M]
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


def focal_class_costs(logits: torch.Tensor, focal_alpha: float, focal_gamma: float) -> torch.Tensor:
    """The focal cost of every class (or text token) column: alpha (1-p)^gamma (-log(p + eps)) - (1-alpha)
    p^gamma (-log(1 - p + eps)) at p = sigmoid(logits); [..., K] -> [..., K] in float32 (float64 stays)."""
    prob = logits.to(torch.promote_types(logits.dtype, torch.float32)).sigmoid()
    complement = 1 - prob
    neg = (complement + FOCAL_EPS).log_().mul_(-(1 - focal_alpha)).mul_(prob**focal_gamma)
    pos = (prob + FOCAL_EPS).log_().mul_(-focal_alpha).mul_(complement.pow_(focal_gamma))
    return pos.sub_(neg)


@torch.no_grad()
def token_class_cost(
    logits: torch.Tensor, label_maps: torch.Tensor, focal_alpha: float = 0.25, focal_gamma: float = 2.0
) -> torch.Tensor:
    """Grounding DINO's class cost: the focal cost of each text token, averaged over the tokens of each target's
    phrase (its row of the label map, normalized to sum 1).

    Args:
        logits: [..., B, N, T] text-token logits; label_maps: [B, M, T], 1 on the tokens of each target's phrase
            (a padded target's row may hold anything: its column is masked by the caller).
    Returns:
        [..., B, N, M] float32 (float64 for float64 logits); a real target with an empty phrase costs NaN.
    """
    per_token = focal_class_costs(logits, focal_alpha, focal_gamma)  # [..., B, N, T]
    weights = label_maps.to(per_token.dtype)
    weights = weights / weights.sum(-1, keepdim=True)  # [B, M, T]
    return per_token @ weights.transpose(-1, -2)  # [..., B, N, M]


@torch.no_grad()
def mask_point_cost(pred_points: torch.Tensor, tgt_points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask2Former's pair-wise mask costs on P sampled points (RF-DETR's matcher): the mean sigmoid cross-entropy
    and the dice cost (+1 smoothed) of every query's mask against every target's of its image.

    Args:
        pred_points: [B, N, P] mask logits at the points; tgt_points: [B, M, P] target mask values (0..1) there.
    Returns:
        (cross-entropy [B, N, M], dice [B, N, M]), float32 (float64 stays).
    """
    dtype = torch.promote_types(pred_points.dtype, torch.float32)
    logits, target = pred_points.to(dtype), tgt_points.to(dtype)
    num_points = logits.shape[-1]
    positive = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    negative = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    cross_entropy = (positive / num_points) @ target.transpose(-1, -2) + (negative / num_points) @ (
        1 - target
    ).transpose(-1, -2)  # [B, N, M]
    prob = logits.sigmoid()
    numerator = 2 * prob @ target.transpose(-1, -2)  # [B, N, M]
    denominator = prob.sum(-1)[..., :, None] + target.sum(-1)[..., None, :]
    return cross_entropy, 1 - (numerator + 1) / (denominator + 1)
