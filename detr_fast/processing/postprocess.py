"""Post-processing of DETR's outputs into detections, semantic, instance and panoptic segmentation, with the
signatures and results of transformers' DetrImageProcessor.

Segmentation results differ from transformers' in two documented places, where transformers' are not what its
documentation promises: with return_coco_annotation, transformers returns its own run lengths of the whole segment
map, which COCO tools cannot read, where each segment here is a COCO RLE ({"size": [H, W], "counts": str},
pycocotools' encoding); and after a fused (stuff) segment transformers numbers the next new segment from the fused
one's id, so two segments can share an id, where ids here stay unique (1, 2, ... in order of appearance).

At the image size, the segment and class maps are decided at the mask resolution and upsampled only along the
boundaries (UpsampledMaps), with the same decisions as transformers' dense upsampling, and the mask
probabilities are computed for the kept queries only (transformers takes the sigmoid of all of them; an element's
sigmoid can differ by an ulp between the two calls, as it does between thread counts in transformers' own).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..reference.box_ops import center_to_corners
from .transforms import batch_buffer
from .upsampled_maps import UpsampledMaps


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


def post_process_semantic_segmentation(outputs, target_sizes=None, return_segmentation_scores: bool = False) -> list:
    """A [H, W] class map per image: argmax over classes of sum over queries of p(class) * sigmoid(mask), resized
    (bilinear) to target_sizes when given; with return_segmentation_scores, dicts {"segmentation", "segmentation_scores"
    [C, H, W]}.

    Without the scores, the map is decided at the low resolution and upsampled values are computed only along the
    class boundaries (UpsampledMaps: the same decisions, the first class on a tie as argmax), never the
    [C, H, W] scores transformers allocates (850 MB for COCO panoptic's 250 classes at 800 x 1066)."""
    classes = outputs.logits.softmax(-1)[..., :-1]  # [B, N, C]
    # into reused memory on the CPU: fresh, the [B, N, h, w] probabilities and the [B, C, h, w] scores cost more in
    # page faults than in computing them
    logits = outputs.pred_masks
    masks = batch_buffer(logits.shape, logits.dtype, logits.device, use="mask probabilities")  # [B, N, h, w]
    torch.sigmoid(logits, out=masks)
    (batch, num_classes), (height, width) = classes.shape[::2], masks.shape[-2:]
    scores = batch_buffer((batch, num_classes, height * width), masks.dtype, masks.device, use="semantic scores")
    torch.bmm(classes.transpose(1, 2), masks.flatten(2), out=scores)  # [B, C, h * w]: einsum bqc,bqhw->bchw
    scores = scores.view(batch, num_classes, height, width)
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
                segmentation = UpsampledMaps(image_scores.float(), size).argmax().map()
        if return_segmentation_scores:
            results.append({"segmentation": segmentation, "segmentation_scores": image_scores})
        else:
            results.append(segmentation)
    return results


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

    The owner of each pixel and each query's own area are decided at the mask resolution, with upsampled values
    only along the boundaries (UpsampledMaps), never transformers' [K, H, W] upsampled masks; the scores and labels
    reach the host once per image, not once per query."""
    size = tuple(target_size) if target_size is not None else tuple(mask_probs.shape[-2:])
    upsampled = UpsampledMaps(mask_probs.float(), size, scores.float())
    owners = upsampled.argmax()
    won_area = owners.counts(len(labels))  # [K]
    own_area = upsampled.count_at_least(mask_threshold)  # [K]
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
    segmentation = owners.map(segment_of_query.to(mask_probs.device))  # [H, W]
    return segmentation, segments


def _kept_queries(outputs, threshold: float):
    """Per image: (mask probabilities [K, h, w], scores [K], labels [K]) of the queries whose best class is a real
    one scoring above threshold."""
    num_labels = outputs.logits.shape[-1] - 1
    scores, labels = outputs.logits.softmax(-1).max(-1)  # [B, N]
    for mask, score, label in zip(outputs.pred_masks, scores, labels):
        keep = (label != num_labels) & (score > threshold)
        yield mask[keep].sigmoid_(), score[keep], label[keep]  # in place on the selection's own copy


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
