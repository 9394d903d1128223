"""DETR's set criterion on padded targets: Hungarian matching and losses of every decoder layer at once.

Fixed shapes throughout (targets padded to [B, M], every query a pair with weight 0 or 1), and no host sync:
`num_boxes` stays a tensor (all-reduced under torch.distributed), the matching reports its per-problem status as a
tensor instead of raising. The loss dict has transformers' keys: loss_ce, loss_bbox, loss_giou, cardinality_error
for the last layer, with an `_i` suffix for auxiliary layer i.

The loss terms are named entries, as in DETR's SetCriterion.get_loss: `DetrLoss.losses` maps each term group
("labels", "boxes", "cardinality") to the method that computes its named values for every decoder layer at once,
and `weight_dict` weighs those values into the total. A new term (the mask loss) is one more method and one more
entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .reference.box_ops import center_to_corners, iou
from .runtime import all_reduce_mean


@torch.no_grad()
def hungarian_match(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    class_cost: float = 1.0,
    bbox_cost: float = 5.0,
    giou_cost: float = 2.0,
    focal: bool = False,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match the queries of every layer and image to their targets (with focal, by the focal class cost of the
    sigmoid DETRs: alpha 0.25 and gamma 2 unless given; with groups, each Group-DETR group of queries to every
    target: see assign).

    Non-finite costs of real targets (a NaN or infinite prediction) are replaced by the largest float32, as
    transformers' matcher does: such a pair is matched only when nothing else can be.

    Args:
        logits: [..., B, N, C+1] ([..., B, N, C] with focal); pred_boxes: [..., B, N, 4] cxcywh.
        targets: padded targets (detr_fast.pad_targets): class_labels [B, M], boxes [B, M, 4], mask [B, M]; the
            real targets of each image come first.
    Returns:
        assignment [..., B, N] int64 (matched target index or -1), status [..., B] uint8 (0 = ok).
    """
    mask = targets["mask"]
    cost = ops.match_cost(
        logits,
        pred_boxes,
        targets["class_labels"],
        targets["boxes"],
        mask,
        class_cost,
        bbox_cost,
        giou_cost,
        focal=focal,
        focal_alpha=focal_alpha,
        focal_gamma=focal_gamma,
    )  # [..., B, N, M]
    return assign(cost, mask, groups)


def assign(cost: torch.Tensor, mask: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimal assignment of a padded matching cost, as transformers' matchers solve it: non-finite costs of real
    targets become the largest float32 (matched only when nothing else can be); padded columns are never read.

    Args:
        cost: [..., B, N, M] (padded columns +inf); mask: [B, M] bool, the real targets of each image first.
        groups: Group-DETR: the queries in `groups` consecutive groups of N // groups, each group matched to every
            target, all in the same solver call; queries past groups * (N // groups) stay unmatched, as in
            transformers.
    Returns:
        assignment [..., B, N] int64 (target index or -1), status [..., B] uint8 (0 = ok; the worst group's); no host
        sync.
    """
    largest = torch.finfo(torch.float32).max
    # one pass; padded columns become finite too, which changes nothing: the solver reads the first num_targets
    cost = cost.nan_to_num(nan=largest, posinf=largest, neginf=largest)
    if groups == 1:
        return ops.linear_assignment(cost, mask.sum(-1), strict=False)
    queries = cost.shape[-2]
    size = queries // groups
    grouped = cost[..., : groups * size, :].unflatten(-2, (groups, size)).movedim(-3, 0)  # [G, ..., B, N // G, M]
    assignment, status = ops.linear_assignment(grouped, mask.sum(-1), strict=False)  # [G, ..., B, N // G]
    assignment = assignment.movedim(0, -2).flatten(-2)  # [..., B, G * (N // G)], query order
    return F.pad(assignment, (0, queries - assignment.shape[-1]), value=-1), status.amax(0)  # [..., B, N]


def num_boxes_across_processes(mask: torch.Tensor) -> torch.Tensor:
    """Mean number of real targets per process, at least 1: mask [B, M] bool -> a float32 scalar tensor (no host
    sync; all-reduced under torch.distributed)."""
    return all_reduce_mean(mask.sum().to(torch.float32)).clamp(min=1)


@dataclass
class Matched:
    """The matching of every decoder layer, what each loss term reads.

    logits [L, B, N, K], pred_boxes [L, B, N, 4]; targets: the padded targets (class_labels [B, M], boxes
    [B, M, 4], mask [B, M]); assignment [L, B, N] (target index or -1); num_boxes: the float32 scalar the terms
    are averaged by; pred_masks [B, N, h, w] (the last layer's mask logits) for the mask term, and
    targets["masks"] [B, M, H, W]. Derived: matched [L, B, N] bool, index [L, B, N] (assignment with -1 as 0, for
    gathers).
    """

    logits: torch.Tensor
    pred_boxes: torch.Tensor
    targets: Mapping[str, torch.Tensor]
    assignment: torch.Tensor
    num_boxes: torch.Tensor
    pred_masks: torch.Tensor | None = None
    matched: torch.Tensor = field(init=False)
    index: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.matched = self.assignment >= 0
        self.index = self.assignment.clamp(min=0)

    def target_classes(self, no_object: int) -> torch.Tensor:
        """[L, B, N]: each query's matched target class, `no_object` for an unmatched query."""
        labels = self.targets["class_labels"].expand(self.assignment.shape[0], -1, -1)  # [L, B, M]
        return torch.where(self.matched, labels.gather(2, self.index), no_object)

    def one_hot_targets(self, num_classes: int) -> torch.Tensor:
        """[L, B, N, C] float32: 1 at each matched query's target class, all zeros for an unmatched query."""
        return F.one_hot(self.target_classes(num_classes), num_classes + 1)[..., :-1].float()

    def target_boxes(self) -> torch.Tensor:
        """[L, B, N, 4]: each query's matched target box (target 0's for an unmatched query)."""
        boxes = self.targets["boxes"].expand(self.assignment.shape[0], -1, -1, -1)  # [L, B, M, 4]
        return boxes.gather(2, self.index[..., None].expand(-1, -1, -1, 4))


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
        mask_loss_coefficient: float | None = None,
        dice_loss_coefficient: float = 1.0,
    ):
        """mask_loss_coefficient (with dice_loss_coefficient) adds the mask term of a segmentation model."""
        super().__init__()
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("DetrLoss: class_cost, bbox_cost and giou_cost cannot all be 0")
        self.num_classes = num_classes
        self.num_logits = num_classes + 1  # the classes and "no object"
        self.focal_matching = False  # subclasses: the focal class cost, with matcher_focal's (alpha, gamma)
        self.matcher_focal = (0.25, 2.0)
        self.groups = 1  # subclasses: Group-DETR's query groups, each matched to every target
        self.costs = (class_cost, bbox_cost, giou_cost)
        # The term groups, in the loss dict's order: name -> the method computing its values (adding a term is
        # adding an entry); and the weight of each value in the total (values without a weight, the cardinality
        # error, are logged only).
        self.losses: dict[str, Callable[[Matched], dict[str, torch.Tensor]]] = {
            "labels": self.loss_labels,
            "boxes": self.loss_boxes,
            "cardinality": self.loss_cardinality,
        }
        self.weight_dict = {"loss_ce": 1.0, "loss_bbox": bbox_loss_coefficient, "loss_giou": giou_loss_coefficient}
        if mask_loss_coefficient is not None:
            self.losses["masks"] = self.loss_masks
            self.weight_dict.update(loss_mask=mask_loss_coefficient, loss_dice=dice_loss_coefficient)
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coefficient
        # Not persistent: it derives from the config, and model state dicts stay equal to transformers'.
        self.register_buffer("class_weight", class_weight, persistent=False)

    @classmethod
    def from_config(cls, config: Any, masks: bool = False) -> DetrLoss:
        """The criterion of a model's config; with masks, of a segmentation model (the mask term added)."""
        return cls(
            config.num_labels,
            config.class_cost,
            config.bbox_cost,
            config.giou_cost,
            config.eos_coefficient,
            config.bbox_loss_coefficient,
            config.giou_loss_coefficient,
            config.mask_loss_coefficient if masks else None,
            config.dice_loss_coefficient,
        )

    def loss_labels(self, m: Matched) -> dict[str, torch.Tensor]:
        """loss_ce [L]: cross-entropy weighted per class (eos_coefficient for "no object"), averaged by the total
        weight (F.cross_entropy's weighted mean)."""
        target_classes = m.target_classes(self.num_classes)  # [L, B, N]
        nll = -F.log_softmax(m.logits.float(), dim=-1).gather(-1, target_classes[..., None]).squeeze(-1)  # [L, B, N]
        class_weight = self.class_weight[target_classes]
        return {"loss_ce": (class_weight * nll).sum((1, 2)) / class_weight.sum((1, 2))}

    def loss_boxes(self, m: Matched) -> dict[str, torch.Tensor]:
        """loss_bbox and loss_giou [L]: L1 and 1 - GIoU of the matched pairs (one fused ops.box_loss for every
        layer), divided by num_boxes."""
        tgt_boxes = m.target_boxes()  # [L, B, N, 4]
        weight = m.matched.flatten(1, 2).float()  # [L, B*N]
        l1, giou = ops.box_loss(m.pred_boxes.flatten(1, 2), tgt_boxes.flatten(1, 2), weight)  # [L], [L]
        return {"loss_bbox": l1 / m.num_boxes, "loss_giou": giou / m.num_boxes}

    @torch.no_grad()
    def loss_cardinality(self, m: Matched) -> dict[str, torch.Tensor]:
        """cardinality_error [L]: mean |number of predicted objects - number of targets| per image (logged only)."""
        predicted = (m.logits.argmax(-1) != self.num_classes).sum(-1)  # [L, B]
        return {"cardinality_error": (predicted - m.targets["mask"].sum(-1)).abs().float().mean(-1)}

    def loss_masks(self, m: Matched) -> dict[str, torch.Tensor]:
        """loss_mask and loss_dice, scalars of the last layer only: the sigmoid focal and dice losses of the matched
        masks (the query's logits upsampled to the targets' size), divided by num_boxes."""
        if m.pred_masks is None or "masks" not in m.targets:
            raise ValueError("DetrLoss: the mask term needs pred_masks and targets with 'masks' [B, M, H, W]")
        focal, dice = ops.mask_loss(m.pred_masks, m.assignment[-1], m.targets["masks"])
        return {"loss_mask": focal / m.num_boxes, "loss_dice": dice / m.num_boxes}

    def match(
        self,
        logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        num_boxes: torch.Tensor,
        pred_masks: torch.Tensor | None = None,
    ) -> tuple[Matched, torch.Tensor]:
        """The checked inputs matched in one call: (Matched, status [L, B]); logits [L, B, N, K], pred_boxes
        [L, B, N, 4]."""
        if logits.dim() != 4 or pred_boxes.shape != (*logits.shape[:-1], 4):
            raise ValueError(
                f"{type(self).__name__}: expected logits [L, B, N, K] and pred_boxes [L, B, N, 4], got "
                f"{tuple(logits.shape)} and {tuple(pred_boxes.shape)}"
            )
        if logits.shape[-1] != self.num_logits:
            raise ValueError(
                f"{type(self).__name__}: logits have {logits.shape[-1]} classes, expected {self.num_logits} "
                f"(num_labels = {self.num_classes})"
            )
        alpha, gamma = self.matcher_focal
        assignment, status = hungarian_match(
            logits, pred_boxes, targets, *self.costs, focal=self.focal_matching, focal_alpha=alpha, focal_gamma=gamma,
            groups=self.groups,
        )  # [L, B, N], [L, B]  # fmt: skip
        return Matched(logits, pred_boxes, targets, assignment, num_boxes, pred_masks), status

    def values(self, m: Matched) -> dict[str, torch.Tensor]:
        """Every term group's values (get_loss), unweighted."""
        values: dict[str, torch.Tensor] = {}
        for name in self.losses:
            values.update(self.get_loss(name, m))
        return values

    def get_loss(self, name: str, m: Matched) -> dict[str, torch.Tensor]:
        """The values of term group `name`: each [L] (one per decoder layer), or a scalar for a term of the last
        layer only."""
        if name not in self.losses:
            raise ValueError(f"DetrLoss: unknown loss {name!r}; expected one of {sorted(self.losses)}")
        return self.losses[name](m)

    def forward(
        self,
        logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        pred_masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Loss of all decoder layers.

        Args:
            logits: [L, B, N, C+1] ([L, B, N, C] for FocalDetrLoss; L = 1 without auxiliary loss, the last layer
                last); pred_boxes: [L, B, N, 4].
            targets: padded targets from detr_fast.pad_targets (with "masks" for the mask term).
            pred_masks: [B, N, h, w], the last layer's mask logits (segmentation).
        Returns:
            loss (scalar: the weighted sum of every layer's terms), loss_dict, match status [L, B].
        """
        num_boxes = num_boxes_across_processes(targets["mask"])
        matched, status = self.match(logits, pred_boxes, targets, num_boxes, pred_masks)
        values = self.values(matched)
        layers = logits.shape[0]
        loss_dict = {}
        for layer in [layers - 1, *range(layers - 1)]:  # the last layer's terms first, then "_i" of layer i
            suffix = "" if layer == layers - 1 else f"_{layer}"
            for key, value in values.items():
                if value.dim() == 1:
                    loss_dict[key + suffix] = value[layer]
                elif layer == layers - 1:
                    loss_dict[key] = value
        loss = sum(weight * values[key].sum() for key, weight in self.weight_dict.items())
        return loss, loss_dict, status


class FocalDetrLoss(DetrLoss):
    """The criterion of the sigmoid DETRs (Deformable, Conditional and DAB DETR: transformers'
    DeformableDetrForObjectDetectionLoss) on padded targets, every decoder layer at once and sync-free: matching by
    the focal class cost (alpha 0.25, gamma 2, as their matchers), a sigmoid focal classification loss over the C
    classes (no "no object" logit), DETR's L1 and GIoU box losses, and the cardinality error of predictions whose
    best class scores above 0.5."""

    def __init__(
        self,
        num_classes: int,
        class_cost: float = 2.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        focal_alpha: float = 0.25,
        bbox_loss_coefficient: float = 5.0,
        giou_loss_coefficient: float = 2.0,
        mask_loss_coefficient: float | None = None,
        dice_loss_coefficient: float = 1.0,
    ):
        """mask_loss_coefficient (with dice_loss_coefficient) adds DetrLoss's mask term."""
        super().__init__(
            num_classes, class_cost, bbox_cost, giou_cost, 0.1, bbox_loss_coefficient, giou_loss_coefficient,
            mask_loss_coefficient, dice_loss_coefficient,
        )  # fmt: skip
        self.num_logits = num_classes
        self.focal_matching = True
        self.focal_alpha = focal_alpha

    @classmethod
    def from_config(cls, config: Any, masks: bool = False) -> FocalDetrLoss:
        """The criterion of a transformers Deformable / Conditional / DAB DETR config (focal_alpha included); with
        masks, of Conditional DETR's segmentation model (transformers' DeformableDetrForSegmentationLoss): the mask
        term added, and the matching by the softmax class cost over the C logits, as its HungarianMatcher does."""
        criterion = cls(
            config.num_labels,
            config.class_cost,
            config.bbox_cost,
            config.giou_cost,
            config.focal_alpha,
            config.bbox_loss_coefficient,
            config.giou_loss_coefficient,
            config.mask_loss_coefficient if masks else None,
            config.dice_loss_coefficient if masks else 1.0,  # DAB DETR's config has no mask coefficients
        )
        criterion.focal_matching = not masks
        return criterion

    def loss_labels(self, m: Matched) -> dict[str, torch.Tensor]:
        """loss_ce [L]: the sigmoid focal loss (alpha focal_alpha, gamma 2) of every query and class against the
        one-hot matched labels (all zeros for unmatched queries), summed and divided by num_boxes."""
        logits = m.logits.float()  # [L, B, N, C]
        onehot = m.one_hot_targets(self.num_classes)  # [L, B, N, C]
        prob = logits.sigmoid()
        cross_entropy = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        p_t = prob * onehot + (1 - prob) * (1 - onehot)
        alpha_t = self.focal_alpha * onehot + (1 - self.focal_alpha) * (1 - onehot)
        focal = alpha_t * cross_entropy * (1 - p_t) ** 2  # [L, B, N, C]
        return {"loss_ce": focal.sum((1, 2, 3)) / m.num_boxes}

    @torch.no_grad()
    def loss_cardinality(self, m: Matched) -> dict[str, torch.Tensor]:
        """cardinality_error [L]: mean |number of queries whose best class probability exceeds 0.5 - number of
        targets| per image (logged only)."""
        predicted = (m.logits.sigmoid().amax(-1) > 0.5).sum(-1)  # [L, B]
        return {"cardinality_error": (predicted - m.targets["mask"].sum(-1)).abs().float().mean(-1)}


class IouAwareDetrLoss(FocalDetrLoss):
    """LW-DETR's and RF-DETR's criterion (transformers' LwDetrForObjectDetectionLoss) on padded targets, sync-free:
    Group-DETR matching (the queries in `groups` consecutive groups, each group matched to every target by the focal
    cost, queries past groups * (N // groups) unmatched; the last decoder layer, the auxiliary layers and the
    encoder proposals in one call), the IoU-aware binary
    cross-entropy (a matched class weighted by max(p^alpha IoU^(1-alpha), 0.01), detached, every other class by
    p^2, not detached, as transformers), DETR's L1 and GIoU box losses, num_boxes counted once per group, and the
    cardinality error of sigmoid > 0.5."""

    def __init__(
        self,
        num_classes: int,
        class_cost: float = 2.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        focal_alpha: float = 0.25,
        class_loss_coefficient: float = 1.0,
        bbox_loss_coefficient: float = 5.0,
        giou_loss_coefficient: float = 2.0,
        groups: int = 1,
    ):
        super().__init__(
            num_classes, class_cost, bbox_cost, giou_cost, focal_alpha, bbox_loss_coefficient, giou_loss_coefficient
        )
        self.weight_dict["loss_ce"] = class_loss_coefficient
        self.groups = groups

    @classmethod
    def from_config(cls, config: Any, masks: bool = False) -> IouAwareDetrLoss:
        """The criterion of a transformers LwDetrConfig / RfDetrConfig (object detection)."""
        if masks:
            raise ValueError("IouAwareDetrLoss: RF-DETR's point-sampled mask term is not one of detr_fast's")
        return cls(
            config.num_labels, config.class_cost, config.bbox_cost, config.giou_cost, config.focal_alpha,
            config.class_loss_coefficient, config.bbox_loss_coefficient, config.giou_loss_coefficient,
            config.group_detr,
        )  # fmt: skip

    def loss_labels(self, m: Matched) -> dict[str, torch.Tensor]:
        """loss_ce [L]: the IoU-aware binary cross-entropy, summed and divided by num_boxes."""
        prob = m.logits.sigmoid()  # [L, B, N, C]
        overlap = iou(center_to_corners(m.pred_boxes.detach()), center_to_corners(m.target_boxes()))  # [L, B, N]
        onehot = m.one_hot_targets(self.num_classes).bool()  # [L, B, N, C]
        quality = (prob.detach().pow(self.focal_alpha) * overlap[..., None].pow(1 - self.focal_alpha)).clamp(min=0.01)
        positive = torch.where(onehot, quality, 0.0)
        negative = torch.where(onehot, 1 - quality, prob.pow(2))
        loss = -positive * prob.log() - negative * (1 - prob).log()
        return {"loss_ce": loss.sum((1, 2, 3)) / m.num_boxes}

    def forward(  # type: ignore[override]
        self, logits: torch.Tensor, pred_boxes: torch.Tensor, targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Loss of every matched set.

        Args:
            logits: [S, B, N, C]: the last decoder layer first, then the auxiliary layers (keys "_0", ...) and the
                encoder proposals (key "_enc"); pred_boxes: [S, B, N, 4].
            targets: padded targets (detr_fast.pad_targets).
        Returns:
            loss (the weighted sum of every set's terms), loss_dict, match status [S, B].
        """
        num_boxes = all_reduce_mean(targets["mask"].sum().to(torch.float32) * self.groups).clamp(min=1)
        matched, status = self.match(logits, pred_boxes, targets, num_boxes)
        values = self.values(matched)
        loss_dict = {}
        for index in range(logits.shape[0]):
            suffix = "" if index == 0 else "_enc" if index == logits.shape[0] - 1 else f"_{index - 1}"
            loss_dict.update({key + suffix: value[index] for key, value in values.items()})
        loss = sum(weight * values[key].sum() for key, weight in self.weight_dict.items())
        return loss, loss_dict, status


class VarifocalDetrLoss(DetrLoss):
    """RT-DETR's criterion (transformers' RTDetrForObjectDetectionLoss, RT-DETR v1 and v2) on padded targets,
    sync-free: the last decoder layer, the auxiliary layers and the encoder proposals matched in one call (RT-DETR's
    matcher: the focal cost with the config's alpha and gamma, or softmax), the varifocal loss (the matched class's
    target is the IoU of the pair) and the L1 / GIoU box losses, each weighted inside the loss dict as RT-DETR does;
    the denoising queries of every layer, with their fixed assignment, are scored the same way."""

    def __init__(
        self,
        num_classes: int,
        class_cost: float = 2.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        focal_matching: bool = True,
        matcher_alpha: float = 0.25,
        matcher_gamma: float = 2.0,
        vfl_alpha: float = 0.75,
        vfl_gamma: float = 2.0,
        weight_vfl: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
    ):
        super().__init__(num_classes, class_cost, bbox_cost, giou_cost, 0.1, weight_bbox, weight_giou)
        self.num_logits = num_classes
        self.focal_matching = focal_matching
        self.matcher_focal = (matcher_alpha, matcher_gamma)
        self.vfl = (vfl_alpha, vfl_gamma)
        self.losses = {"vfl": self.loss_vfl, "boxes": self.loss_boxes}
        self.weight_dict = {"loss_vfl": weight_vfl, "loss_bbox": weight_bbox, "loss_giou": weight_giou}

    @classmethod
    def from_config(cls, config: Any, masks: bool = False) -> VarifocalDetrLoss:
        """The criterion of a transformers RTDetrConfig / RTDetrV2Config."""
        if masks:
            raise ValueError("VarifocalDetrLoss: RT-DETR has no mask term")
        return cls(
            config.num_labels, config.matcher_class_cost, config.matcher_bbox_cost, config.matcher_giou_cost,
            bool(config.use_focal_loss), config.matcher_alpha, config.matcher_gamma, config.focal_loss_alpha,
            config.focal_loss_gamma, config.weight_loss_vfl, config.weight_loss_bbox, config.weight_loss_giou,
        )  # fmt: skip

    def loss_vfl(self, m: Matched) -> dict[str, torch.Tensor]:
        """loss_vfl [S]: binary cross-entropy of every query and class against the IoU of its matched pair at its
        target's class (0 elsewhere), weighted alpha p^gamma where the target is 0 and by the IoU where it is not,
        summed and divided by num_boxes."""
        alpha, gamma = self.vfl
        logits = m.logits.float()  # [S, B, N, C]
        pred_corners = center_to_corners(m.pred_boxes.detach().float())
        overlap = iou(pred_corners, center_to_corners(m.target_boxes()))  # [S, B, N]
        onehot = m.one_hot_targets(self.num_classes)  # [S, B, N, C]
        target_score = (overlap * m.matched)[..., None] * onehot
        weight = alpha * logits.detach().sigmoid().pow(gamma) * (1 - onehot) + target_score
        loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
        return {"loss_vfl": loss.sum((1, 2, 3)) / m.num_boxes}

    def weighted_terms(self, m: Matched) -> dict[str, torch.Tensor]:
        """The weighted terms of every matched set: {"loss_vfl", "loss_bbox", "loss_giou"}, each [S]."""
        return {key: value * self.weight_dict[key] for key, value in self.values(m).items()}

    def forward(  # type: ignore[override]
        self,
        logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        denoising: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Loss of the matched sets and of the denoising queries.

        Args:
            logits: [S, B, N, C]: the last decoder layer first, then the auxiliary layers and the encoder proposals
                (keys "_aux_0", ..., "_aux_{S-2}"); pred_boxes: [S, B, N, 4].
            targets: padded targets (detr_fast.pad_targets).
            denoising: (logits [L, B, D, C], boxes [L, B, D, 4], assignment [B, D] (target index or -1), number of
                denoising groups) of every decoder layer's denoising queries (keys "_dn_0", ..., "_dn_{L-1}").
        Returns:
            loss (the sum of the weighted terms), loss_dict, match status [S, B].
        """
        num_boxes = targets["mask"].sum().to(torch.float32).clamp(min=1)  # RT-DETR's: this process's targets
        matched, status = self.match(logits, pred_boxes, targets, num_boxes)  # [S, B, N] matched in one call
        values = self.weighted_terms(matched)
        loss_dict = {}
        for index in range(logits.shape[0]):
            suffix = "" if index == 0 else f"_aux_{index - 1}"
            loss_dict.update({key + suffix: value[index] for key, value in values.items()})
        if denoising is not None:
            dn_logits, dn_boxes, dn_assignment, groups = denoising
            dn_assignment = dn_assignment.expand(dn_logits.shape[0], -1, -1)  # [L, B, D]
            dn_matched = Matched(dn_logits, dn_boxes, targets, dn_assignment, num_boxes * groups)
            dn_values = self.weighted_terms(dn_matched)
            for layer in range(dn_logits.shape[0]):
                loss_dict.update({f"{key}_dn_{layer}": value[layer] for key, value in dn_values.items()})
        loss = sum(loss_dict.values())
        return loss, loss_dict, status
