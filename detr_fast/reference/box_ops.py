"""Box conversions and (generalized) IoU, batched over any leading dimensions.

Boxes are cxcywh (center x, center y, width, height) or xyxy (x0, y0, x1, y1), normalized or absolute. Nothing
here checks the boxes on the host (no assert, no `.all()`): the formulas are applied as written, so a degenerate
pair (zero union, or zero enclosing area) yields NaN, as torchvision's and transformers' formulas do. Valid boxes
(x1 > x0, y1 > y0) always give finite values.
"""

import torch


def center_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """cxcywh [..., 4] -> xyxy [..., 4]."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def corners_to_center(boxes: torch.Tensor) -> torch.Tensor:
    """xyxy [..., 4] -> cxcywh [..., 4]."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """xyxy [..., 4] -> area [...]."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def generalized_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of corresponding boxes: xyxy boxes1 [..., 4], boxes2 [..., 4] (broadcast) -> [...]."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    inter_wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1 + area2 - inter
    iou = inter / union
    hull_wh = (torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / hull


def pairwise_generalized_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of every pair: xyxy boxes1 [..., N, 4], boxes2 [..., M, 4] -> [..., N, M]."""
    return generalized_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])
