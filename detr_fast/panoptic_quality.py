"""Panoptic quality (PQ, SQ, RQ; Kirillov et al. 2019) with panopticapi's rules, the COCO panoptic evaluation.

Per image, a ground-truth and a predicted segment map ([H, W] segment ids, 0 = void) with their segments:
- a (ground truth, prediction) pair of the same category matches when its IoU is above 0.5, where the union leaves
  out the prediction's void pixels (unique: two segments of one map cannot both overlap another by more than half);
- ground-truth crowd segments (iscrowd 1) are never matched nor counted as misses; a ground-truth segment's area is
  its listed "area" (COCO's), as panopticapi takes it, else its pixel count;
- an unmatched prediction is a false positive unless more than half of it lies on void pixels or on the crowd
  region of its own category;
- per category, PQ = sum of matched IoUs / (TP + FP/2 + FN/2), SQ = sum of IoUs / TP (0 without a TP),
  RQ = TP / (TP + FP/2 + FN/2); a summary averages the categories that occur (TP + FP + FN > 0), and is 0 when none
  does (panopticapi divides by zero there).

torchmetrics' PanopticQuality scores void pixels differently and overstates PQ; panopticapi is the reference
(tests/test_panoptic_quality.py compares with its pq_compute). Where panopticapi would go on with corrupt input (a
segment id in a map but not in its list, a segment listed twice, a ground-truth category it does not know), this
raises a ValueError naming the image and the segment.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .processing.annotations import read_segment_map

VOID = 0


@dataclass
class CategoryCounts:
    """One category's matches: true positives, false positives, false negatives and the sum of matched IoUs."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0


@dataclass
class PanopticCounts:
    """The per-category counts of every image seen so far (add images with `update`, read PQ with `summary`)."""

    categories: Mapping[int, bool]  # category id -> is a thing
    per_category: dict[int, CategoryCounts] = field(default_factory=lambda: defaultdict(CategoryCounts))

    def update(
        self,
        gt_map: np.ndarray,
        gt_segments: Sequence[Mapping],
        pred_map: np.ndarray,
        pred_segments: Sequence[Mapping],
        image: str = "image",
    ) -> None:
        """Count one image's matches.

        Args:
            gt_map, pred_map: [H, W] integer segment ids (0 = void, in both).
            gt_segments: [{"id", "category_id", "iscrowd" (default 0)}]; pred_segments: [{"id", "category_id"}].
            image: the image's name, for the errors.
        Raises:
            ValueError naming the image and the segment: maps of different sizes, a segment id in a map but not in
            its list or listed twice, a listed predicted segment absent from its map, an unknown category.
        """
        if gt_map.shape != pred_map.shape:
            raise ValueError(f"{image}: the ground-truth map is {gt_map.shape} but the prediction {pred_map.shape}")
        gt = _segments_with_areas(gt_map, gt_segments, "ground truth", image, self.categories, strict=False)
        pred = _segments_with_areas(pred_map, pred_segments, "prediction", image, self.categories, strict=True)
        pair = gt_map.astype(np.uint64) * np.uint64(2**32) + pred_map.astype(np.uint64)
        labels, counts = np.unique(pair, return_counts=True)
        intersection = {(int(g), int(p)): int(n) for g, p, n in zip(labels >> 32, labels & (2**32 - 1), counts)}
        matched_gt, matched_pred = set(), set()
        for (gt_id, pred_id), inter in intersection.items():
            if gt_id not in gt or pred_id not in pred:
                continue  # void on either side
            g, p = gt[gt_id], pred[pred_id]
            if g["iscrowd"] or g["category_id"] != p["category_id"]:
                continue
            union = p["area"] + g["area"] - inter - intersection.get((VOID, pred_id), 0)
            iou = inter / union
            if iou > 0.5:
                counts_of = self.per_category[g["category_id"]]
                counts_of.tp += 1
                counts_of.iou += iou
                matched_gt.add(gt_id)
                matched_pred.add(pred_id)
        crowd_of_category = {}
        for gt_id, g in gt.items():
            if g["iscrowd"]:
                crowd_of_category[g["category_id"]] = gt_id  # panopticapi keeps one crowd segment per category
            elif gt_id not in matched_gt:
                self.per_category[g["category_id"]].fn += 1
        for pred_id, p in pred.items():
            if pred_id in matched_pred:
                continue
            ignored = intersection.get((VOID, pred_id), 0)
            if p["category_id"] in crowd_of_category:
                ignored += intersection.get((crowd_of_category[p["category_id"]], pred_id), 0)
            if ignored / p["area"] <= 0.5:
                self.per_category[p["category_id"]].fp += 1

    def summary(self) -> dict[str, dict]:
        """{"all", "things", "stuff"}: {"pq", "sq", "rq", "n"} averaged over the categories that occur, and
        "per_category": {id: {"pq", "sq", "rq"}} (zeros for a category that never occurs)."""
        per_category = {}
        for category in self.categories:
            c = self.per_category.get(category, CategoryCounts())
            denominator = c.tp + 0.5 * c.fp + 0.5 * c.fn
            if denominator == 0:
                per_category[category] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            per_category[category] = {
                "pq": c.iou / denominator,
                "sq": c.iou / c.tp if c.tp else 0.0,
                "rq": c.tp / denominator,
            }
        result: dict[str, dict] = {"per_category": per_category}
        for name, keep in (("all", lambda thing: True), ("things", bool), ("stuff", lambda thing: not thing)):
            occurring = [
                category
                for category, thing in self.categories.items()
                if keep(thing) and category in self.per_category and _occurs(self.per_category[category])
            ]
            n = len(occurring)
            result[name] = {
                metric: (sum(per_category[c][metric] for c in occurring) / n if n else 0.0)
                for metric in ("pq", "sq", "rq")
            }
            result[name]["n"] = n
        return result


def _occurs(counts: CategoryCounts) -> bool:
    return counts.tp + counts.fp + counts.fn > 0


def _segments_with_areas(
    segment_map: np.ndarray,
    segments: Sequence[Mapping],
    side: str,
    image: str,
    categories: Mapping[int, bool],
    strict: bool,
) -> dict[int, dict]:
    """{id: {"category_id", "iscrowd", "area"}} of the listed segments. Every non-void id of the map must be listed;
    with `strict` (predictions) every listed segment must be in the map and its area is counted there; otherwise
    (ground truth) a listed segment without pixels still counts (a miss, unless crowd) and its area is the listed
    "area" where there is one."""
    ids, areas = np.unique(segment_map, return_counts=True)
    area_of = {int(i): int(a) for i, a in zip(ids, areas) if i != VOID}
    found: dict[int, dict] = {}
    for segment in segments:
        segment_id = int(segment["id"])
        if segment_id in found:
            raise ValueError(f"{image}: the {side} lists segment {segment_id} twice")
        if segment["category_id"] not in categories:
            raise ValueError(f"{image}: {side} segment {segment_id} has unknown category {segment['category_id']}")
        if strict and segment_id not in area_of:
            raise ValueError(f"{image}: {side} segment {segment_id} is listed but absent from its map")
        found[segment_id] = {
            "category_id": segment["category_id"],
            "iscrowd": int(segment.get("iscrowd", 0)),
            # panopticapi takes a ground-truth segment's area from its JSON (COCO's "area"), a prediction's from its map
            "area": area_of.get(segment_id, 0) if strict else int(segment.get("area", area_of.get(segment_id, 0))),
        }
    unlisted = sorted(set(area_of) - set(found))
    if unlisted:
        raise ValueError(f"{image}: {side} segment {unlisted[0]} is in the map but not in its segments_info")
    return found


def panoptic_quality(
    images: Iterable[tuple[np.ndarray, Sequence[Mapping], np.ndarray, Sequence[Mapping]]],
    categories: Mapping[int, bool] | Sequence[Mapping],
) -> dict[str, dict]:
    """PQ, SQ and RQ of predicted panoptic maps against the ground truth.

    Args:
        images: per image (gt_map [H, W], gt_segments, pred_map [H, W], pred_segments), as PanopticCounts.update.
        categories: {category id: is a thing}, or COCO's categories [{"id", "isthing"}].
    Returns:
        PanopticCounts.summary(): "all", "things", "stuff" ({"pq", "sq", "rq", "n"}) and "per_category".
    """
    counts = PanopticCounts(_category_kinds(categories))
    for index, (gt_map, gt_segments, pred_map, pred_segments) in enumerate(images):
        counts.update(gt_map, gt_segments, pred_map, pred_segments, image=f"image {index}")
    return counts.summary()


def _category_kinds(categories: Mapping[int, bool] | Sequence[Mapping]) -> dict[int, bool]:
    if isinstance(categories, Mapping):
        return {int(k): bool(v) for k, v in categories.items()}
    return {int(c["id"]): bool(c["isthing"]) for c in categories}


def panoptic_quality_of_files(gt_json: str, pred_json: str, gt_folder: str, pred_folder: str) -> dict[str, dict]:
    """PQ of COCO panoptic predictions (a JSON with "annotations" [{"image_id", "file_name", "segments_info"}] and
    their PNGs) against the ground truth in the same format, as panopticapi's pq_compute: every ground-truth image
    must have a prediction, and the ground truth's "categories" give things and stuff."""
    with open(gt_json) as f:
        gt = json.load(f)
    with open(pred_json) as f:
        pred = json.load(f)
    predictions = {a["image_id"]: a for a in pred["annotations"]}
    counts = PanopticCounts(_category_kinds(gt["categories"]))
    for annotation in gt["annotations"]:
        image = annotation["image_id"]
        if image not in predictions:
            raise ValueError(f"{pred_json}: no prediction for image {image} ({annotation['file_name']})")
        prediction = predictions[image]
        counts.update(
            read_segment_map(os.path.join(gt_folder, annotation["file_name"])),
            annotation["segments_info"],
            read_segment_map(os.path.join(pred_folder, prediction["file_name"])),
            prediction["segments_info"],
            image=f"image {image} ({prediction['file_name']})",
        )
    return counts.summary()
