"""Box conversions and (generalized) IoU, batched over any leading dimensions.

Boxes are cxcywh (center x, center y, width, height) or xyxy (x0, y0, x1, y1), normalized or absolute. Nothing
here checks the boxes on the host (no assert, no `.all()`). For valid boxes (x1 > x0, y1 > y0) the values are
exactly torchvision's and transformers' formulas. Degenerate boxes have a defined result instead of NaN:

- GIoU = IoU - (hull - union) / hull, where IoU := 0 when union == 0 and the hull term := 0 when hull == 0, each
  with zero gradient. So two identical points have GIoU 0, two distinct points -1 (or 0 on a common line), and every
  pair of finite boxes gives a finite GIoU and finite gradients. Only a degenerate pair (both boxes of zero area)
  can reach a zero union; a degenerate box against a valid one takes the formula unchanged.
- NaN or infinite coordinates are not masked: they propagate through the formula as IEEE arithmetic does.
- Clamping at 0 (intersection and hull sides) passes the gradient at exactly 0 (touching boxes) and NaN through:
  `torch.clamp(min=0)` does not pin this down (its gradient at the bound is 1 in older torch releases and 0 in
  recent ones, e.g. 2.14), and the Triton kernels must reproduce one function on every torch version.
- torch.maximum/minimum ties (identical or nested edges) split the gradient half/half, as autograd does.
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


def clamp_min_zero(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0) elementwise; the gradient passes at exactly 0 and at NaN (which stays NaN)."""
    return torch.where(x < 0, 0.0, x)


def divide_or_zero(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 0 with zero gradient where denominator == 0 (NaN still propagates)."""
    zero = denominator == 0
    # The denominator is replaced before dividing, so that the unused branch cannot put NaN into the gradient.
    return torch.where(zero, 0.0, numerator / torch.where(zero, 1.0, denominator))


def intersection_and_union(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of corresponding xyxy boxes [..., 4] (broadcast) -> ([...], [...])."""
    inter_wh = clamp_min_zero(torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2]))
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    return inter, box_area(boxes1) + box_area(boxes2) - inter


def iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding boxes: xyxy boxes1 [..., 4], boxes2 [..., 4] (broadcast) -> [...]; 0 for a zero union."""
    inter, union = intersection_and_union(boxes1, boxes2)
    return divide_or_zero(inter, union)


def generalized_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of corresponding boxes: xyxy boxes1 [..., 4], boxes2 [..., 4] (broadcast) -> [...].

    Degenerate pairs follow the module's definition (IoU 0 for a zero union, no hull term for a zero hull).
    """
    inter, union = intersection_and_union(boxes1, boxes2)
    hull_wh = clamp_min_zero(torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2]))
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return divide_or_zero(inter, union) - divide_or_zero(hull - union, hull)


def pairwise_generalized_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of every pair: xyxy boxes1 [..., N, 4], boxes2 [..., M, 4] -> [..., N, M]."""
    return generalized_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])
