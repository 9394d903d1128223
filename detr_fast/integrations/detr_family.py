"""Batched, sync-free Hungarian matching for the DETR descendants in transformers.

Every DETR-family loss in transformers (`transformers/loss/loss_*.py`) builds a matcher that computes the cost of
every query against every target of the whole batch, copies it to the host and runs scipy's solver image by image
(and group by group for Group-DETR), once per decoder layer, encoder proposal set and call. Inside
`batched_matchers()` those matcher classes are replaced by subclasses whose forward computes each image's own cost
block on padded targets (ops.match_cost, plus ops.token_class_cost / ops.mask_point_cost where the family needs
them) and solves every image and group in one ops.linear_assignment call, on the outputs' device, without a host
sync. The result has transformers' format: per image (query indices ascending, target indices), int64, on the
outputs' device; the criteria index with them as before, so the loss is the same function of the same matching.

Replaced (the matcher of each family; the criterion stays transformers' code except for the models of
FOCAL_CRITERION_MODELS, VARIFOCAL_CRITERION_MODELS, IOU_AWARE_CRITERION_MODELS and SEGMENTATION_CRITERION_MODELS,
whose whole criterion integrations.transformers replaces with detr_fast's):

| transformers loss module: matcher | cost | models |
|---|---|---|
| loss_for_object_detection, loss_deformable_detr: HungarianMatcher | softmax class | DETR, ConditionalDetr seg. |
| loss_deformable_detr: DeformableDetrHungarianMatcher | focal (0.25, 2) class | Deformable, Conditional, DAB |
| loss_rt_detr, loss_d_fine: RTDetrHungarianMatcher | focal (config) or softmax | RT-DETR v1/v2, D-FINE, DEIMv2 |
| loss_lw_detr: LwDetrHungarianMatcher | focal, per Group-DETR group | LW-DETR, RF-DETR |
| loss_rf_detr: RfDetrHungarianMatcher | focal + point mask costs, per group | RF-DETR instance segmentation |
| loss_grounding_dino: GroundingDinoHungarianMatcher | focal over text tokens per phrase | Grounding DINO, MM |

D-FINE's and DEIMv2's criteria (RTDetrLoss.forward, Deimv2Loss.forward) ask the matcher for one layer at a time;
inside the context their forward first has it match the last layer and every auxiliary output (decoder layers,
encoder proposals) in one call, and each layer's call is answered from that.

The swap is process-wide for the duration of the context (a patched model's loss call); do not run an unpatched
model's loss in another thread at the same time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..data.targets import pad_targets
from ..loss import DetrLoss, FocalDetrLoss, assign

# transformers' model classes whose loss runs with batched matchers (their matcher is in REPLACEMENTS).
FAMILY_MODELS = (
    "DetrForSegmentation",
    "ConditionalDetrForObjectDetection",
    "ConditionalDetrForSegmentation",
    "DabDetrForObjectDetection",
    "DeformableDetrForObjectDetection",
    "RTDetrForObjectDetection",
    "RTDetrV2ForObjectDetection",
    "DFineForObjectDetection",
    "Deimv2ForObjectDetection",
    "LwDetrForObjectDetection",
    "RfDetrForObjectDetection",
    "RfDetrForInstanceSegmentation",
    "GroundingDinoForObjectDetection",
    "MMGroundingDinoForObjectDetection",
)

# Of those, the models whose whole criterion (DeformableDetrForObjectDetectionLoss) is replaced by FocalDetrLoss.
FOCAL_CRITERION_MODELS = (
    "ConditionalDetrForObjectDetection",
    "DabDetrForObjectDetection",
    "DeformableDetrForObjectDetection",
)

# And the segmentation models whose criterion (ForSegmentationLoss, DeformableDetrForSegmentationLoss) is replaced
# by DetrLoss or FocalDetrLoss with the mask term.
SEGMENTATION_CRITERION_MODELS = {"DetrForSegmentation": DetrLoss, "ConditionalDetrForSegmentation": FocalDetrLoss}

# And those whose criterion (LwDetrForObjectDetectionLoss) is replaced by IouAwareDetrLoss.
IOU_AWARE_CRITERION_MODELS = ("LwDetrForObjectDetection", "RfDetrForObjectDetection")

# And those whose criterion (RTDetrForObjectDetectionLoss) is replaced by VarifocalDetrLoss.
VARIFOCAL_CRITERION_MODELS = ("RTDetrForObjectDetection", "RTDetrV2ForObjectDetection")

# transformers' own focal matching constants (hard-coded in its Deformable, LW, RF and Grounding DINO matchers).
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


# ----------------------------------------------------------------------------------------- targets and indices


def pad_rows(rows: torch.Tensor, sizes: Sequence[int], slots: int) -> torch.Tensor:
    """Per-target rows of the whole batch, [sum(sizes), ...] -> [B, slots, ...] (zeros in the padded slots)."""
    padded = rows.new_zeros((len(sizes), slots, *rows.shape[1:]))
    start = 0
    for i, size in enumerate(sizes):
        padded[i, :size] = rows[start : start + size]
        start += size
    return padded


def solve(cost: torch.Tensor, padded: dict, groups: int = 1) -> list:
    """The optimal matching of each image (and Group-DETR group) in one batched call, in transformers' format.

    Args:
        cost: [..., B, N, M] per-image costs on padded targets (padded columns +inf), of one or more layers;
            padded: _padded_for's result.
        groups: the queries split into `groups` consecutive groups of N // groups, each matched to every target
            (queries past groups * (N // groups) are never matched, as in transformers).
    Returns:
        per image (query indices ascending, their target indices), int64 on the cost's device; a list of those per
        layer when cost has leading layer dimensions ([L, B, N, M]: a list of L).
    """
    *layers, batch, num_queries, slots = cost.shape
    group_size = num_queries // groups
    assignment, _ = assign(cost, padded["mask"], groups)  # [..., B, N]; status is ok: every real cost is finite
    queries = torch.arange(num_queries, device=cost.device).expand_as(assignment)
    # matched queries first, then the others, each in ascending order: the position of each from running counts,
    # on the device instead of a nonzero's host sync
    matched = assignment >= 0
    matched_up_to = matched.cumsum(-1)  # [..., B, N]
    position = torch.where(matched, matched_up_to - 1, matched_up_to[..., -1:] + queries - matched_up_to)
    order = torch.empty_like(assignment).scatter_(-1, position, queries)  # [..., B, N]
    matched_targets = assignment.gather(-1, order)  # [..., B, N]
    counts = [groups * min(group_size, size) for size in padded["sizes"]]
    # each image's first counts[b] entries, as views made by one split of each layer's orders and one of its targets:
    # the images' rows laid end to end and split at [count_0, rest_0, count_1, rest_1, ...]
    pieces = [size for count in counts for size in (count, num_queries - count)]

    def per_image(order, matched_targets):  # [B, N] each
        orders, targets = order.flatten().split(pieces), matched_targets.flatten().split(pieces)
        return list(zip(orders[::2], targets[::2]))

    if not layers:
        return per_image(order, matched_targets)
    return [per_image(o, t) for o, t in zip(order.flatten(0, -3), matched_targets.flatten(0, -3))]


# ------------------------------------------------------------------------------------------- the matchers' costs


def box_and_class_cost(
    matcher, outputs: Mapping, padded: dict, focal: bool, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA
) -> torch.Tensor:
    """The matcher's weighted L1 + class + GIoU cost per image: [B, N, M], padded columns +inf."""
    return ops.match_cost(
        outputs["logits"], outputs["pred_boxes"], padded["class_labels"], padded["boxes"], padded["mask"],
        matcher.class_cost, matcher.bbox_cost, matcher.giou_cost, focal=focal, focal_alpha=alpha, focal_gamma=gamma,
    )  # fmt: skip


def _padded_for(matcher, outputs: Mapping, targets: Sequence[Mapping]) -> dict:
    """The targets padded on the outputs' device without a host check (pad_targets(check=False): the model's own
    loss reads them as they are), with their "sizes"; kept on the matcher for its next call with the same list: a
    loss builds its matcher per call and matches every layer (and the encoder proposals) against the same targets."""
    cached = matcher.__dict__.get("_detr_fast_padded")
    if cached is not None and cached[0] is targets:
        return cached[1]
    boxes_only = [{"class_labels": target["class_labels"], "boxes": target["boxes"]} for target in targets]
    padded = {
        **pad_targets(boxes_only, device=outputs["pred_boxes"].device, check=False),
        "sizes": [len(target["boxes"]) for target in targets],
    }
    matcher.__dict__["_detr_fast_padded"] = (targets, padded)
    return padded


def softmax_forward(self, outputs, targets):
    """HungarianMatcher.forward (DETR): -softmax class cost."""
    padded = _padded_for(self, outputs, targets)
    return solve(box_and_class_cost(self, outputs, padded, focal=False), padded)


def focal_forward(self, outputs, targets):
    """DeformableDetrHungarianMatcher.forward: the focal class cost with alpha 0.25, gamma 2."""
    padded = _padded_for(self, outputs, targets)
    return solve(box_and_class_cost(self, outputs, padded, focal=True), padded)


def rt_detr_forward(self, outputs, targets):
    """RTDetrHungarianMatcher.forward: focal with the config's matcher_alpha / matcher_gamma, or softmax; the
    answer prefetched for these outputs when rt_detr_prefetch matched them with the other layers."""
    prefetched = self.__dict__.get("_detr_fast_prefetched", {}).get(id(outputs["logits"]))
    if prefetched is not None and prefetched[0] is outputs["logits"]:
        return prefetched[1]
    padded = _padded_for(self, outputs, targets)
    return solve(_rt_detr_cost(self, outputs, padded), padded)


def _rt_detr_cost(matcher, outputs: Mapping, padded: dict) -> torch.Tensor:
    return box_and_class_cost(matcher, outputs, padded, focal=bool(matcher.use_focal_loss), alpha=matcher.alpha,
                              gamma=matcher.gamma)  # fmt: skip


def rt_detr_prefetch(matcher, outputs: Mapping, targets: Sequence[Mapping]) -> None:
    """Match the last layer and every auxiliary output (D-FINE's decoder layers and encoder proposals), which
    RTDetrLoss and Deimv2Loss then ask the matcher for one call at a time, in one batched call per shape; each
    call is answered from it (rt_detr_forward) until the criterion returns."""
    layers = [outputs, *outputs.get("auxiliary_outputs", ())]
    by_shape: dict = {}
    for layer in layers:
        if isinstance(layer, Mapping) and "logits" in layer and "pred_boxes" in layer:
            by_shape.setdefault((layer["logits"].shape, layer["pred_boxes"].shape), []).append(layer)
    padded = _padded_for(matcher, outputs, targets)
    prefetched = {}
    for group in by_shape.values():
        stacked = {key: torch.stack([layer[key] for layer in group]) for key in ("logits", "pred_boxes")}
        for layer, indices in zip(group, solve(_rt_detr_cost(matcher, stacked, padded), padded)):  # [L, B, N, M]
            prefetched[id(layer["logits"])] = (layer["logits"], indices)
    matcher.__dict__["_detr_fast_prefetched"] = prefetched


def group_forward(self, outputs, targets, group_detr):
    """LwDetrHungarianMatcher.forward: the focal cost, each Group-DETR group of queries matched to every target."""
    padded = _padded_for(self, outputs, targets)
    return solve(box_and_class_cost(self, outputs, padded, focal=True), padded, groups=group_detr)


def sample_points(maps: torch.Tensor, points: torch.Tensor, mode: str) -> torch.Tensor:
    """maps [K, H, W] read at points [P, 2] (x, y in [0, 1]) by grid_sample (align_corners=False) -> [K, P]; all
    maps share the points, so they are sampled as the channels of one image."""
    grid = (2.0 * points - 1.0)[None, :, None, :]  # [1, P, 1, 2]
    return F.grid_sample(maps[None], grid, mode=mode, align_corners=False)[0, :, :, 0]  # [K, P]


def rf_segmentation_forward(self, outputs, targets, group_detr):
    """RfDetrHungarianMatcher.forward: the focal box and class cost plus the mask costs (sigmoid cross-entropy and
    dice) on random points shared by all masks, drawn as transformers draws them (the same torch.rand call, so the
    same points under the same seed), per Group-DETR group."""
    padded = _padded_for(self, outputs, targets)
    cost = box_and_class_cost(self, outputs, padded, focal=True)  # [B, N, M]
    masks = outputs["pred_masks"]  # [B, N, H, W]
    batch, num_queries = masks.shape[:2]
    # transformers takes the point count from the flattened boxes' shape: (B * N) * 4 // ratio
    num_points = batch * num_queries * 4 // self.mask_point_sample_ratio
    points = torch.rand(1, num_points, 2, device=masks.device)[0]  # [P, 2]
    pred_points = sample_points(masks.flatten(0, 1), points, "bilinear").unflatten(0, (batch, num_queries))
    target_masks = torch.cat([target["masks"] for target in targets]).to(masks.dtype)  # [sum M_i, h, w]
    sizes, slots = padded["sizes"], padded["mask"].shape[1]
    if target_masks.shape[0]:
        tgt_points = pad_rows(sample_points(target_masks, points, "nearest"), sizes, slots)  # [B, M, P]
    else:
        tgt_points = pred_points.new_zeros((batch, slots, num_points))
    cross_entropy, dice = ops.mask_point_cost(pred_points, tgt_points)  # [B, N, M] each
    cost = cost + self.cost_mask_class * cross_entropy + self.cost_mask_dice * dice
    return solve(cost.masked_fill(~padded["mask"][:, None, :], float("inf")), padded, groups=group_detr)


def grounding_forward(self, outputs, targets):
    """GroundingDinoHungarianMatcher.forward: the class cost over text tokens (ops.token_class_cost: each token's
    focal cost averaged over the target phrase's tokens) with the L1 and GIoU box costs."""
    padded = _padded_for(self, outputs, targets)
    cost = ops.match_cost(
        outputs["logits"], outputs["pred_boxes"], padded["class_labels"], padded["boxes"], padded["mask"],
        0.0, self.bbox_cost, self.giou_cost, focal=True,
    )  # fmt: skip  # the box terms; the class term is over phrases, not logit columns
    phrase_maps = torch.cat(
        [label_map[target["class_labels"]] for label_map, target in zip(outputs["label_maps"], targets)]
    )  # [sum M_i, T]
    label_maps = pad_rows(phrase_maps, padded["sizes"], padded["mask"].shape[1])  # [B, M, T]
    class_cost = ops.token_class_cost(outputs["logits"], label_maps, FOCAL_ALPHA, FOCAL_GAMMA)  # [B, N, M]
    cost = cost + self.class_cost * class_cost
    return solve(cost.masked_fill(~padded["mask"][:, None, :], float("inf")), padded)


# --------------------------------------------------------------------------------------------------- the swap

# (transformers loss module, matcher class name there, our forward): every name a family's loss instantiates.
REPLACEMENTS: tuple[tuple[str, str, Callable], ...] = (
    ("transformers.loss.loss_for_object_detection", "HungarianMatcher", softmax_forward),
    ("transformers.loss.loss_deformable_detr", "HungarianMatcher", softmax_forward),
    ("transformers.loss.loss_deformable_detr", "DeformableDetrHungarianMatcher", focal_forward),
    ("transformers.loss.loss_rt_detr", "RTDetrHungarianMatcher", rt_detr_forward),
    ("transformers.loss.loss_d_fine", "RTDetrHungarianMatcher", rt_detr_forward),  # D-FINE and DEIMv2 rebuild it
    ("transformers.loss.loss_lw_detr", "LwDetrHungarianMatcher", group_forward),
    ("transformers.loss.loss_rf_detr", "RfDetrHungarianMatcher", rf_segmentation_forward),
    ("transformers.loss.loss_grounding_dino", "GroundingDinoHungarianMatcher", grounding_forward),
)

# (transformers loss module, criterion class name there): criteria that match their layers one matcher call at a
# time; within the context their forward first has the matcher match them all at once (rt_detr_prefetch).
PREFETCHING_CRITERIA: tuple[tuple[str, str], ...] = (
    ("transformers.loss.loss_rt_detr", "RTDetrLoss"),  # D-FINE's criterion inherits its forward
    ("transformers.loss.loss_deimv2", "Deimv2Loss"),
)

_lock = threading.RLock()
_depth = 0
_saved: list[tuple[object, str, type]] = []
_subclasses: dict[tuple[type, Callable], type] = {}


def _prefetching(forward: Callable) -> Callable:
    """A criterion's forward that first has its (batched) matcher match every layer in one call."""

    @functools.wraps(forward)
    def prefetching_forward(self, outputs, targets):
        matcher = getattr(self, "matcher", None)
        ours = getattr(type(matcher), "_detr_fast_forward", None) is rt_detr_forward and isinstance(outputs, Mapping)
        if not ours or "_detr_fast_prefetched" in matcher.__dict__:
            return forward(self, outputs, targets)  # not our matcher, or prefetched by a subclass's forward
        with torch.no_grad():
            rt_detr_prefetch(matcher, outputs, targets)
        try:
            return forward(self, outputs, targets)
        finally:
            del matcher.__dict__["_detr_fast_prefetched"]

    return prefetching_forward


def _batched_class(original: type, forward: Callable) -> type:
    """A subclass of transformers' matcher whose forward is ours (built once per class)."""
    key = (original, forward)
    if key not in _subclasses:
        attributes = {"forward": torch.no_grad()(forward), "_detr_fast_forward": forward}
        _subclasses[key] = type(f"Batched{original.__name__}", (original,), attributes)
    return _subclasses[key]


@contextlib.contextmanager
def batched_matchers() -> Iterator[None]:
    """Within the context, the DETR-family losses of transformers build batched matchers (REPLACEMENTS); loss
    modules the installed transformers lacks are passed over. Re-entrant."""
    global _depth
    with _lock:
        if _depth == 0:
            for module_name, class_name, forward in REPLACEMENTS:
                try:
                    module = importlib.import_module(module_name)
                except ImportError:
                    continue
                original = getattr(module, class_name, None)
                if original is None:
                    continue
                _saved.append((module, class_name, original))
                setattr(module, class_name, _batched_class(original, forward))
            for module_name, class_name in PREFETCHING_CRITERIA:
                try:
                    criterion = getattr(importlib.import_module(module_name), class_name)
                except (ImportError, AttributeError):
                    continue
                _saved.append((criterion, "forward", criterion.forward))
                criterion.forward = _prefetching(criterion.forward)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                while _saved:
                    module, class_name, original = _saved.pop()
                    setattr(module, class_name, original)


def batched_loss_function(loss_function: Callable) -> Callable:
    """`loss_function` (a transformers DETR-family loss) run with batched matchers."""

    def batched(*args, **kwargs):
        with batched_matchers():
            return loss_function(*args, **kwargs)

    batched.__wrapped__ = loss_function
    batched.__doc__ = f"{getattr(loss_function, '__name__', 'the loss')} with detr_fast's batched matchers"
    return batched
