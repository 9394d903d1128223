"""`match_cost`: the DETR matching cost of every decoder layer on padded targets, [..., B, N, M]."""

import torch

from .. import reference
from ._checks import FLOATS, check_shape, check_tensor

OP = "detr_fast.match_cost"
INTS = (torch.int64, torch.int32)


def check_match_cost_args(logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask) -> None:
    """Validate the arguments of `match_cost` (metadata only, no host sync)."""
    check_tensor(OP, "logits", logits, min_ndim=3, dtypes=FLOATS)
    device = logits.device
    check_tensor(OP, "pred_boxes", pred_boxes, min_ndim=3, dtypes=FLOATS, device=device)
    check_shape(OP, "pred_boxes", pred_boxes, (*logits.shape[:-1], 4), "[..., B, N, 4] matching logits [..., B, N, C+1]")
    batch = logits.shape[-3]
    check_tensor(OP, "tgt_labels", tgt_labels, ndim=2, dtypes=INTS, device=device)
    if tgt_labels.shape[0] != batch:
        raise ValueError(f"{OP}: tgt_labels has shape {tuple(tgt_labels.shape)}; expected [B={batch}, M]")
    num_targets = tgt_labels.shape[1]
    check_tensor(OP, "tgt_boxes", tgt_boxes, ndim=3, dtypes=FLOATS, device=device)
    check_shape(OP, "tgt_boxes", tgt_boxes, (batch, num_targets, 4), "[B, M, 4] matching tgt_labels [B, M]")
    check_tensor(OP, "tgt_mask", tgt_mask, ndim=2, dtypes=(torch.bool,), device=device)
    check_shape(OP, "tgt_mask", tgt_mask, (batch, num_targets), "[B, M] matching tgt_labels")


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
    """bbox_w * L1 + class_w * -softmax(logits)[label] + giou_w * -GIoU per image, never the (B·N)×ΣM matrix.

    Args:
        logits: [..., B, N, C+1]; pred_boxes: [..., B, N, 4] cxcywh (leading dims: decoder layers).
        tgt_labels: [B, M] int; tgt_boxes: [B, M, 4] cxcywh; tgt_mask: [B, M] bool, True = real target.
    Returns:
        [..., B, N, M] float32 (float64 for float64 inputs); padded columns are +inf.
    """
    check_match_cost_args(logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask)
    return reference.match_cost(logits, pred_boxes, tgt_labels.long(), tgt_boxes, tgt_mask, class_w, bbox_w, giou_w)
