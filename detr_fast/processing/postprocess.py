"""Post-processing of DETR's outputs into detections, semantic, instance and panoptic segmentation, with the
signatures and results of transformers' DetrImageProcessor.

Segmentation results differ from transformers' in two documented places, where transformers' are not what its
documentation promises: with return_coco_annotation, transformers returns its own run lengths of the whole segment
map, which COCO tools cannot read, where each segment here is a COCO RLE ({"size": [H, W], "counts": str},
pycocotools' encoding); and after a fused (stuff) segment transformers numbers the next new segment from the fused
one's id, so two segments can share an id, where ids here stay unique (1, 2, ... in order of appearance).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..reference.box_ops import center_to_corners


def _sizes(target_sizes, batch: int, device: torch.device) -> torch.Tensor | None:
    """target_sizes (a [B, 2] tensor or a list of (height, width)) as a [B, 2] tensor, checked against the batch."""
    if target_sizes is None:
        return None
    if len(target_sizes) != batch:
        raise ValueError(f"target_sizes has {len(target_sizes)} entries but the batch has {batch} images")
    return torch.as_tensor(target_sizes, device=device)


def post_process_object_detection(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    threshold: float = 0.5,
    target_sizes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """logits [B, N, C+1], pred_boxes [B, N, 4] normalized cxcywh -> per image {"scores" [K], "labels" [K],
    "boxes" [K, 4] xyxy} of the queries whose best real class scores above `threshold`, boxes in pixels of
    target_sizes [B, 2] (height, width) when given."""
    probs = logits.softmax(-1)
    scores, labels = probs[..., :-1].max(-1)  # [B, N]
    boxes = center_to_corners(pred_boxes)  # [B, N, 4]
    sizes = _sizes(target_sizes, len(logits), boxes.device)
    if sizes is not None:
        height, width = sizes.to(boxes.dtype).unbind(1)
        boxes = boxes * torch.stack([width, height, width, height], dim=1)[:, None, :]
    results = []
    for s, l, b in zip(scores, labels, boxes):
        keep = s > threshold
        results.append({"scores": s[keep], "labels": l[keep], "boxes": b[keep]})
    return results


CLASSES_PER_BLOCK = 16  # the semantic map upsamples this many classes' scores at a time


def post_process_semantic_segmentation(outputs, target_sizes=None, return_segmentation_scores: bool = False) -> list:
    """A [H, W] class map per image: argmax over classes of sum over queries of p(class) * sigmoid(mask), resized
    (bilinear) to target_sizes when given; with return_segmentation_scores, dicts {"segmentation", "segmentation_scores"
    [C, H, W]}.

    Without the scores, the map is made CLASSES_PER_BLOCK classes at a time (the same upsampled values, the first
    class on a tie as argmax), never the [C, H, W] scores transformers allocates (850 MB for COCO panoptic's 250
    classes at 800 x 1066)."""
    classes = outputs.logits.softmax(-1)[..., :-1]  # [B, N, C]
    masks = outputs.pred_masks.sigmoid()  # [B, N, h, w]
    scores = torch.einsum("bqc,bqhw->bchw", classes, masks)  # [B, C, h, w]
    if target_sizes is not None and len(target_sizes) != len(scores):
        raise ValueError(f"target_sizes has {len(target_sizes)} entries but the batch has {len(scores)} images")
    results = []
    for i in range(len(scores)):
        image_scores = scores[i]  # [C, h, w]
        if target_sizes is None:
            segmentation = image_scores.argmax(0)
        else:
            size = tuple(int(v) for v in target_sizes[i])
            if return_segmentation_scores:
                image_scores = F.interpolate(image_scores[None], size=size, mode="bilinear", align_corners=False)[0]
                segmentation = image_scores.argmax(0)
            else:
                segmentation = _argmax_of_upsampled(image_scores, size)
        if return_segmentation_scores:
            results.append({"segmentation": segmentation, "segmentation_scores": image_scores})
        else:
            results.append(segmentation)
    return results


def _argmax_of_upsampled(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """argmax over classes of scores [C, h, w] bilinearly upsampled to `size`, CLASSES_PER_BLOCK classes at a time:
    [H, W] int64."""
    best = best_class = None
    for start in range(0, len(scores), CLASSES_PER_BLOCK):
        block = F.interpolate(
            scores[None, start : start + CLASSES_PER_BLOCK], size, mode="bilinear", align_corners=False
        )[0]
        block_best, block_class = block.max(0)  # [H, W], the first maximum (10x faster than argmax(0) on the CPU)
        if best is None:
            best, best_class = block_best, block_class
        else:
            better = block_best > best  # strictly: an earlier class keeps a tie
            best = torch.where(better, block_best, best)
            best_class = torch.where(better, block_class + start, best_class)
    return best_class


def _segments(
    mask_probs: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    mask_threshold: float,
    overlap_mask_area_threshold: float,
    label_ids_to_fuse: Iterable[int],
    target_size: tuple[int, int] | None,
) -> tuple[torch.Tensor, list[dict]]:
    """The segment map [H, W] (0 where no segment) and segments of one image's kept queries, as transformers'
    compute_segments: each pixel goes to the query of the highest score-weighted mask probability (the first on a
    tie, as argmax); a query keeps its segment when it wins pixels and they are more than
    overlap_mask_area_threshold of its own mask (weighted probability >= mask_threshold); the labels in
    label_ids_to_fuse share one segment per image.

    One query at a time: its mask is upsampled (the same values as upsampling all of them at once), weighted, and
    folded into the running maximum, so memory stays at a few [H, W] maps instead of transformers' [K, H, W]; the
    scores and labels reach the host once per image, not once per query."""
    size = tuple(target_size) if target_size is not None else tuple(mask_probs.shape[-2:])
    best = owner = None
    own_area = torch.zeros(len(labels), dtype=torch.int64, device=mask_probs.device)
    for k in range(len(labels)):
        probs = mask_probs[k]
        if target_size is not None:
            probs = F.interpolate(probs[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        weighted = probs * scores[k]  # [H, W]
        own_area[k] = torch.count_nonzero(weighted >= mask_threshold)
        if best is None:
            best, owner = weighted, torch.zeros(size, dtype=torch.int64, device=weighted.device)
        else:
            better = weighted > best  # strictly: the first query keeps a tie, as argmax
            best = torch.where(better, weighted, best)
            owner.masked_fill_(better, k)
    won_area = torch.bincount(owner.flatten(), minlength=len(labels))  # [K]
    exists = (won_area > 0) & (own_area > 0)
    exists &= won_area / own_area.clamp(min=1) > overlap_mask_area_threshold
    segment_of_query = torch.zeros(len(labels), dtype=torch.int32)  # 0: no segment
    segments, fused, next_id = [], {}, 0
    fuse = set(label_ids_to_fuse)
    for k, keep, label, score in zip(range(len(labels)), exists.tolist(), labels.tolist(), scores.tolist()):
        if not keep:
            continue
        if label in fused:
            segment_id = fused[label]
        else:
            next_id += 1
            segment_id = next_id
        segment_of_query[k] = segment_id
        segments.append({"id": segment_id, "label_id": label, "was_fused": label in fuse, "score": round(score, 6)})
        if label in fuse:
            fused[label] = segment_id
    segmentation = segment_of_query.to(owner.device)[owner]  # [H, W]
    return segmentation, segments


def _kept_queries(outputs, threshold: float):
    """Per image: (mask probabilities [K, h, w], scores [K], labels [K]) of the queries whose best class is a real
    one scoring above threshold."""
    num_labels = outputs.logits.shape[-1] - 1
    scores, labels = outputs.logits.softmax(-1).max(-1)  # [B, N]
    masks = outputs.pred_masks.sigmoid()  # [B, N, h, w]
    for mask, score, label in zip(masks, scores, labels):
        keep = (label != num_labels) & (score > threshold)
        yield mask[keep], score[keep], label[keep]


def _segmentation_results(outputs, threshold, mask_threshold, overlap, label_ids_to_fuse, target_sizes):
    if target_sizes is not None and len(target_sizes) != len(outputs.logits):
        raise ValueError(f"target_sizes has {len(target_sizes)} entries but the batch has {len(outputs.logits)} images")
    results = []
    for i, (masks, scores, labels) in enumerate(_kept_queries(outputs, threshold)):
        size = None if target_sizes is None else tuple(int(v) for v in target_sizes[i])
        if len(labels) == 0:  # transformers' "no segment" map: -1 everywhere
            height, width = size if size is not None else masks.shape[1:]
            results.append({"segmentation": torch.full((height, width), -1.0), "segments_info": []})
            continue
        segmentation, segments = _segments(masks, scores, labels, mask_threshold, overlap, label_ids_to_fuse, size)
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def post_process_instance_segmentation(
    outputs,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    target_sizes=None,
    return_coco_annotation: bool = False,
) -> list[dict]:
    """Per image {"segmentation": [H, W] segment ids (-1 everywhere when no query is kept), "segments_info":
    [{"id", "label_id", "was_fused", "score"}]}; with return_coco_annotation, "segmentation" is a list of COCO RLEs,
    one per segment in segments_info's order."""
    results = _segmentation_results(outputs, threshold, mask_threshold, overlap_mask_area_threshold, (), target_sizes)
    if return_coco_annotation:
        for result in results:
            result["segmentation"] = [
                segment_to_rle(result["segmentation"] == segment["id"]) for segment in result["segments_info"]
            ]
    return results


def post_process_panoptic_segmentation(
    outputs,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: set[int] | None = None,
    target_sizes=None,
) -> list[dict]:
    """As post_process_instance_segmentation, with the labels of label_ids_to_fuse (stuff) fused into one segment
    per image."""
    return _segmentation_results(
        outputs, threshold, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse or (), target_sizes
    )


def segment_to_rle(mask: torch.Tensor) -> dict:
    """A [H, W] bool mask as COCO's compressed RLE {"size": [H, W], "counts": str} (pycocotools' encoding)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
