"""`box_loss`: L1 and GIoU losses of weighted (matched) box pairs, summed over the pair dimension."""

import torch

from .. import reference
from ._checks import FLOATS, check_shape, check_tensor

OP = "detr_fast.box_loss"


def box_loss(pred_boxes: torch.Tensor, tgt_boxes: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_k w_k |p_k - t_k|_1, sum_k w_k (1 - GIoU(p_k, t_k))) over the last pair dim.

    Args:
        pred_boxes: [..., K, 4] cxcywh; tgt_boxes: [..., K, 4] cxcywh (a valid box even where weight is 0).
        weight: [..., K], 1 for matched pairs and 0 for the rest.
    Returns:
        (l1, giou), each [...] in float32 (float64 for float64 inputs).
    """
    check_tensor(OP, "pred_boxes", pred_boxes, min_ndim=2, dtypes=FLOATS)
    if pred_boxes.shape[-1] != 4:
        raise ValueError(f"{OP}: pred_boxes has shape {tuple(pred_boxes.shape)}; expected [..., K, 4]")
    check_tensor(OP, "tgt_boxes", tgt_boxes, dtypes=FLOATS, device=pred_boxes.device)
    check_shape(OP, "tgt_boxes", tgt_boxes, pred_boxes.shape, "tgt_boxes must have pred_boxes' shape")
    check_tensor(OP, "weight", weight, dtypes=FLOATS + (torch.bool,), device=pred_boxes.device)
    check_shape(OP, "weight", weight, pred_boxes.shape[:-1], "one weight per pair: pred_boxes' shape without the 4")
    return reference.box_loss(pred_boxes, tgt_boxes, weight)
