"""Evaluation of segmentation models: mask mAP (pycocotools' "segm") on a COCO detection set with instance masks,
and panoptic quality (panopticapi's rules, detr_fast.panoptic_quality) on a COCO panoptic set.

The mask logits cover the padded batch at stride 4; each image's masks are upsampled over its own cells and cut to
its own pixels (DETR's evaluation: upsample to the padded size, then cut) before they are resized to the image
file's size, so an image is scored the same whatever it was batched with.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.datasets import CocoDetection, CocoPanoptic
from .evaluate import METRIC_NAMES, coco_metrics, label_categories, model_outputs
from .panoptic_quality import PanopticCounts
from .processing.annotations import read_segment_map
from .processing.postprocess import post_process_panoptic_segmentation, segment_to_rle

QUERIES_PER_CHUNK = 16  # instance masks are resized to the image's size this many queries at a time
# The class probability a query needs to be a segment in panoptic evaluation: DETR's (PostProcessPanoptic), which
# its COCO PQ figures use; and the default of transformers' post_process_panoptic_segmentation.
PANOPTIC_THRESHOLD = 0.85
PROCESSOR_THRESHOLD = 0.5


def _predictions(
    model: nn.Module,
    dataset,
    batch_size: int,
    device: torch.device,
    amp: str,
    num_workers: int,
    indices: Sequence[int] | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, tuple[int, int]]]:
    """Per image (of `dataset`, or its items `indices`): (image id, logits [N, C+1] float32, mask logits [N, H, W]
    float32 at the model input's resolution over the image's own pixels, (height, width) of the image file)."""
    for batch, output in model_outputs(model, dataset, batch_size, device, amp, num_workers, indices):
        padded_height, padded_width = batch["pixel_values"].shape[-2:]
        # the mask head's integer stride (4 for a ResNet: ceil(H / 4) cells of 4 pixels)
        stride_y = max(1, round(padded_height / output.pred_masks.shape[-2]))
        stride_x = max(1, round(padded_width / output.pred_masks.shape[-1]))
        for i, image_id in enumerate(batch["image_ids"].tolist()):
            height, width = batch["sizes"][i].tolist()
            rows, columns = math.ceil(height / stride_y), math.ceil(width / stride_x)
            cells = output.pred_masks[i, :, :rows, :columns].float()  # [N, rows, columns]
            # to the pixels the cells cover, then the image's own: as upsampling the whole batch and cutting
            covered = (rows * stride_y, columns * stride_x)
            masks = F.interpolate(cells[None], size=covered, mode="bilinear", align_corners=False)[0]
            yield image_id, output.logits[i].float(), masks[:, :height, :width], tuple(batch["orig_sizes"][i].tolist())


def panoptic_maps(
    model: nn.Module,
    dataset: CocoPanoptic,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    amp: str = "auto",
    threshold: float = PANOPTIC_THRESHOLD,
    num_workers: int = 0,
    indices: Sequence[int] | None = None,
) -> Iterator[tuple[int, np.ndarray, list[dict]]]:
    """The panoptic result of `model` on each image of `dataset` (or its items `indices`), as panopticapi reads a
    prediction: post_process_panoptic_segmentation at the image file's size, queries above `threshold` as DETR's
    panoptic evaluation keeps them, the stuff categories fused into one segment each.

    Yields:
        (image id, segment id map [H, W] int64 (0: no segment), segments [{"id", "category_id"}], one per id).
    """
    categories = label_categories(model, dataset)
    stuff_labels = _stuff_labels(categories, dataset)
    for image_id, logits, masks, size in _predictions(
        model, dataset, batch_size, torch.device(device), amp, num_workers, indices
    ):
        yield image_id, *_panoptic_result(logits, masks, size, categories, stuff_labels, threshold)


def _stuff_labels(categories: list[int], dataset: CocoPanoptic) -> set[int]:
    """The model's labels of the stuff categories (fused into one segment per image)."""
    return {label for label, category in enumerate(categories) if not dataset.category_is_thing[category]}


def _panoptic_result(
    logits: torch.Tensor,
    masks: torch.Tensor,
    size: tuple[int, int],
    categories: list[int],
    stuff_labels: set[int],
    threshold: float,
) -> tuple[np.ndarray, list[dict]]:
    """One image's panoptic result as panopticapi reads it, from its logits [N, C+1] and mask logits [N, h, w]:
    (segment id map [H, W] int64 at the file's `size`, segments [{"id", "category_id"}])."""
    outputs = SimpleNamespace(logits=logits[None], pred_masks=masks[None])
    result = post_process_panoptic_segmentation(
        outputs, threshold, label_ids_to_fuse=stuff_labels, target_sizes=[size]
    )[0]
    # a fused (stuff) segment is listed once per query that joined it: once here
    fused = {s["id"]: {"id": s["id"], "category_id": categories[s["label_id"]]} for s in result["segments_info"]}
    segments = list(fused.values())
    pred_map = result["segmentation"].cpu().numpy().astype(np.int64) if segments else np.zeros(size, np.int64)
    return pred_map, segments


def evaluate_panoptic(
    model: nn.Module,
    dataset: CocoPanoptic,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    amp: str = "auto",
    threshold: float = PANOPTIC_THRESHOLD,
    num_workers: int = 0,
    masks: bool = False,
) -> dict:
    """PQ, SQ and RQ of `model` on `dataset`: each image's panoptic result (as panoptic_maps) against the dataset's
    PNG, crowd regions and void pixels as panopticapi scores them; with `masks`, from the same model outputs, also
    the things' mask mAP (as evaluate_instances on this set: its thing segments are the instances).

    Returns:
        {"pq", "sq", "rq" (all categories), "pq_things", ..., "rq_stuff", "num_images", and "per_category":
        {category id: {"pq", "sq", "rq"}}}; with masks also "mask_" + METRIC_NAMES.
    """
    annotations = {annotation["image_id"]: annotation for annotation in dataset.panoptic["annotations"]}
    records = {record["id"]: record for record in dataset.images}
    counts = PanopticCounts(dataset.category_is_thing)
    categories = label_categories(model, dataset)
    stuff_labels = _stuff_labels(categories, dataset)
    results, image_ids = [], []
    for image_id, logits, mask_logits, size in _predictions(
        model, dataset, batch_size, torch.device(device), amp, num_workers
    ):
        pred_map, segments = _panoptic_result(logits, mask_logits, size, categories, stuff_labels, threshold)
        record = records[image_id]
        counts.update(
            read_segment_map(record["png"]), annotations[image_id]["segments_info"], pred_map, segments,
            image=f"image id {image_id} ({record['png']})",
        )  # fmt: skip
        if masks:
            results += instance_results(image_id, logits, mask_logits, size, categories)
        image_ids.append(image_id)
    summary = counts.summary()
    metrics = {
        f"{metric}{suffix}": summary[group][metric]
        for group, suffix in (("all", ""), ("things", "_things"), ("stuff", "_stuff"))
        for metric in ("pq", "sq", "rq")
    }
    metrics.update(num_images=len(image_ids), per_category=summary["per_category"])
    if masks:
        metrics.update(_mask_metrics(thing_instances(dataset), results, image_ids))
    return metrics


def instance_results(
    image_id: int, logits: torch.Tensor, masks: torch.Tensor, size: tuple[int, int], categories: list[int]
) -> list[dict]:
    """COCO "segm" result entries of one image, one per query as DETR evaluates them: the query's most probable real
    class with that probability as the score, its mask the sigmoid of its logits resized (bilinear) to the image's
    `size` and thresholded at 0.5, as a COCO RLE."""
    scores, labels = logits.softmax(-1)[:, :-1].max(-1)  # [N]
    results = []
    for start in range(0, len(masks), QUERIES_PER_CHUNK):
        chunk = masks[start : start + QUERIES_PER_CHUNK, None]  # [n, 1, h, w]
        binary = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)[:, 0].sigmoid() > 0.5
        for offset, mask in enumerate(binary):
            query = start + offset
            results.append(
                {
                    "image_id": image_id,
                    "category_id": categories[int(labels[query])],
                    "segmentation": segment_to_rle(mask),
                    "score": round(float(scores[query]), 5),
                }
            )
    return results


def thing_instances(dataset: CocoPanoptic):
    """The thing segments of a COCO panoptic set as COCO instance annotations (a pycocotools COCO): each segment of a
    thing category its mask from the PNG as RLE, its area, box and iscrowd; the categories are the things only, so
    that COCOeval scores no stuff (a query predicting stuff is not an instance)."""
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO

    things = {category for category, is_thing in dataset.category_is_thing.items() if is_thing}
    records = {record["id"]: record for record in dataset.images}
    annotations = []
    for entry in dataset.panoptic["annotations"]:
        record = records.get(entry["image_id"])
        segments = [s for s in entry["segments_info"] if s["category_id"] in things]
        if record is None or not segments:
            continue
        segment_map = read_segment_map(record["png"])  # [H, W]
        for segment in segments:
            rle = coco_mask.encode(np.asfortranarray((segment_map == segment["id"]).astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": record["id"], "category_id": segment["category_id"],
                "segmentation": rle, "area": float(coco_mask.area(rle)), "bbox": coco_mask.toBbox(rle).tolist(),
                "iscrowd": int(segment.get("iscrowd", 0)),
            })  # fmt: skip
    coco = COCO()
    coco.dataset = {
        "images": [{"id": r["id"], "height": r["size"][0], "width": r["size"][1]} for r in dataset.images],
        "categories": [c for c in dataset.panoptic["categories"] if c["id"] in things],
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints
        coco.createIndex()
    return coco


def evaluate_instances(
    model: nn.Module,
    dataset: CocoDetection | CocoPanoptic,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    amp: str = "auto",
    num_workers: int = 0,
    verbose: bool = False,
) -> dict:
    """Mask mAP of `model` on `dataset`: COCOeval "segm" of every query's mask (instance_results) against the
    annotations' masks; on a COCO detection set with segmentations, or on a COCO panoptic set, whose thing segments
    are then the instances (thing_instances).

    Returns:
        "mask_" + METRIC_NAMES -> value, plus "num_images".
    """
    device = torch.device(device)
    categories = label_categories(model, dataset)
    ground_truth = thing_instances(dataset) if isinstance(dataset, CocoPanoptic) else dataset.coco
    results, image_ids = [], []
    for image_id, logits, masks, size in _predictions(model, dataset, batch_size, device, amp, num_workers):
        results += instance_results(image_id, logits, masks, size, categories)
        image_ids.append(image_id)
    return {**_mask_metrics(ground_truth, results, image_ids, verbose), "num_images": len(image_ids)}


def _mask_metrics(ground_truth, results: list[dict], image_ids: list[int], verbose: bool = False) -> dict:
    """COCOeval "segm" of instance_results entries against a pycocotools COCO: "mask_" + METRIC_NAMES -> value."""
    metrics = coco_metrics(ground_truth, results, image_ids, verbose, iou_type="segm")
    return {f"mask_{name}": metrics[name] for name in METRIC_NAMES}
