"""DETR's set criterion on padded targets: Hungarian matching and losses of every decoder layer at once.

Fixed shapes throughout (targets padded to [B, M], every query a pair with weight 0 or 1), and no host sync:
`num_boxes` stays a tensor (all-reduced under torch.distributed), the matching reports its per-problem status as a
tensor instead of raising. The loss dict has transformers' keys: loss_ce, loss_bbox, loss_giou, cardinality_error
for the last layer, with an `_i` suffix for auxiliary layer i.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import ops

TERMS = ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")


@torch.no_grad()
def hungarian_match(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    class_cost: float = 1.0,
    bbox_cost: float = 5.0,
    giou_cost: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match the queries of every layer and image to their targets.

    Non-finite costs of real targets (a NaN or infinite prediction) are replaced by the largest float32, as
    transformers' matcher does: such a pair is matched only when nothing else can be.

    Args:
        logits: [..., B, N, C+1]; pred_boxes: [..., B, N, 4] cxcywh.
        targets: padded targets (detr_fast.pad_targets): class_labels [B, M], boxes [B, M, 4], mask [B, M]; the
            real targets of each image come first.
    Returns:
        assignment [..., B, N] int64 (matched target index or -1), status [..., B] uint8 (0 = ok).
    """
    mask = targets["mask"]
    cost = ops.match_cost(
        logits, pred_boxes, targets["class_labels"], targets["boxes"], mask, class_cost, bbox_cost, giou_cost
    )  # [..., B, N, M]
    cost = torch.where(mask[:, None, :] & ~cost.isfinite(), torch.finfo(torch.float32).max, cost)
    return ops.linear_assignment(cost, mask.sum(-1), strict=False)


def num_boxes_across_processes(mask: torch.Tensor) -> torch.Tensor:
    """Mean number of real targets per process, at least 1: mask [B, M] bool -> a float32 scalar tensor (no host
    sync; all-reduced under torch.distributed)."""
    num_boxes = mask.sum().to(torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(num_boxes)
        num_boxes = num_boxes / dist.get_world_size()
    return num_boxes.clamp(min=1)


class DetrLoss(nn.Module):
    """Matching plus classification (weighted cross-entropy), L1 and GIoU box losses, and the cardinality error."""

    def __init__(
        self,
        num_classes: int,
        class_cost: float = 1.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        eos_coefficient: float = 0.1,
        bbox_loss_coefficient: float = 5.0,
        giou_loss_coefficient: float = 2.0,
    ):
        super().__init__()
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("DetrLoss: class_cost, bbox_cost and giou_cost cannot all be 0")
        self.num_classes = num_classes
        self.costs = (class_cost, bbox_cost, giou_cost)
        self.weights = {"loss_ce": 1.0, "loss_bbox": bbox_loss_coefficient, "loss_giou": giou_loss_coefficient}
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coefficient
        # Not persistent: it derives from the config, and model state dicts stay equal to transformers'.
        self.register_buffer("class_weight", class_weight, persistent=False)

    @classmethod
    def from_config(cls, config: Any) -> DetrLoss:
        return cls(
            config.num_labels,
            config.class_cost,
            config.bbox_cost,
            config.giou_cost,
            config.eos_coefficient,
            config.bbox_loss_coefficient,
            config.giou_loss_coefficient,
        )

    def forward(
        self, logits: torch.Tensor, pred_boxes: torch.Tensor, targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Loss of all decoder layers.

        Args:
            logits: [L, B, N, C+1] (L = 1 without auxiliary loss, the last layer last); pred_boxes: [L, B, N, 4].
            targets: padded targets from detr_fast.pad_targets.
        Returns:
            loss (scalar: the weighted sum of every layer's terms), loss_dict, match status [L, B].
        """
        if logits.dim() != 4 or pred_boxes.shape != (*logits.shape[:-1], 4):
            raise ValueError(
                f"DetrLoss: expected logits [L, B, N, C+1] and pred_boxes [L, B, N, 4], got {tuple(logits.shape)} "
                f"and {tuple(pred_boxes.shape)}"
            )
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"DetrLoss: logits have {logits.shape[-1]} classes, expected num_labels + 1 = {self.num_classes + 1}"
            )
        mask = targets["mask"]
        assignment, status = hungarian_match(logits, pred_boxes, targets, *self.costs)  # [L, B, N], [L, B]
        matched = assignment >= 0
        index = assignment.clamp(min=0)
        layers = logits.shape[0]
        labels = targets["class_labels"].expand(layers, -1, -1)  # [L, B, M]
        target_classes = torch.where(matched, labels.gather(2, index), self.num_classes)  # [L, B, N]

        # Cross-entropy weighted per class, averaged by the total weight (F.cross_entropy's weighted mean).
        nll = -F.log_softmax(logits.float(), dim=-1).gather(-1, target_classes[..., None]).squeeze(-1)  # [L, B, N]
        class_weight = self.class_weight[target_classes]
        loss_ce = (class_weight * nll).sum((1, 2)) / class_weight.sum((1, 2))  # [L]

        boxes = targets["boxes"].expand(layers, -1, -1, -1)  # [L, B, M, 4]
        tgt_boxes = boxes.gather(2, index[..., None].expand(-1, -1, -1, 4))  # [L, B, N, 4]
        l1, giou = ops.box_loss(pred_boxes.flatten(1, 2), tgt_boxes.flatten(1, 2), matched.flatten(1, 2).float())
        num_boxes = num_boxes_across_processes(mask)

        with torch.no_grad():
            predicted = (logits.argmax(-1) != self.num_classes).sum(-1)  # [L, B]
            cardinality = (predicted - mask.sum(-1)).abs().float().mean(-1)  # [L]

        per_layer = {"loss_ce": loss_ce, "loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}
        per_layer["cardinality_error"] = cardinality
        loss_dict = {}
        for layer in [layers - 1, *range(layers - 1)]:
            suffix = "" if layer == layers - 1 else f"_{layer}"
            for term in TERMS:
                loss_dict[term + suffix] = per_layer[term][layer]
        loss = sum(self.weights[term] * per_layer[term] for term in self.weights).sum()
        return loss, loss_dict, status
