"""Evaluation: COCO box mAP with pycocotools on any COCO-format set (`detr-fast eval`).

Every query of every image is a detection (its most probable real class, with that probability as the score), as
DETR evaluates; boxes go back to the pixels of the original image file. `map` is AP@[.5:.95], `map50` AP@.5, and
the other names follow COCOeval's twelve summary numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .data.collate import collate
from .data.datasets import CocoDetection
from .processing.postprocess import post_process_object_detection
from .runtime import autocast, autocast_dtype, is_distributed, rank_and_world_size

METRIC_NAMES = (
    "map",
    "map50",
    "map75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


def detections_to_coco(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    image_ids: Sequence[int],
    orig_sizes: torch.Tensor,
    label_to_category_id: Sequence[int],
) -> list[dict]:
    """COCO result entries for a batch: one per query.

    Args:
        logits: [B, N, C+1]; pred_boxes: [B, N, 4] normalized cxcywh (relative to the unpadded image).
        image_ids: B COCO image ids; orig_sizes: [B, 2] (height, width) of the image files.
        label_to_category_id: the COCO category id of each model label.
    Returns:
        [{"image_id", "category_id", "bbox": [x, y, w, h] in pixels, "score"}] of length B * N.
    """
    results = []
    detections = post_process_object_detection(
        logits.float(), pred_boxes.float(), threshold=0.0, target_sizes=orig_sizes
    )
    for image_id, detection in zip(image_ids, detections):
        boxes = detection["boxes"].clone()  # [N, 4] xyxy
        boxes[:, 2:] -= boxes[:, :2]  # [N, 4] xywh
        for box, label, score in zip(boxes.tolist(), detection["labels"].tolist(), detection["scores"].tolist()):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_category_id[label]),
                    "bbox": [round(v, 3) for v in box],
                    "score": round(score, 5),
                }
            )
    return results


def coco_metrics(
    coco_gt, results: list[dict], image_ids: Sequence[int] | None = None, verbose: bool = False, iou_type: str = "bbox"
) -> dict:
    """COCOeval (`iou_type`: "bbox", or "segm" for masks) of `results` against the ground truth `coco_gt` (a
    pycocotools COCO).

    Args:
        results: COCO result entries ({"image_id", "category_id", "bbox" xywh or "segmentation" RLE, "score"});
            may be empty.
        image_ids: evaluate only these images (default: every image of coco_gt).
        verbose: print COCOeval's summary table.
    Returns:
        {name: value} for METRIC_NAMES (-1 where the set has no ground truth of that kind, as COCOeval reports).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        if results:
            coco_dt = coco_gt.loadRes(list(results))
        else:  # loadRes cannot take an empty list; no detections is a valid (all-zero) result
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset["images"]),
                "categories": list(coco_gt.dataset["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}


def label_categories(model: nn.Module, dataset: CocoDetection) -> list[int]:
    """The COCO category id of each label of `model` on `dataset`: the ids the model was trained with
    (config.category_ids), else the dataset's in increasing order (the training pipeline's own mapping). ValueError
    when they do not fit the dataset; a warning when a label's name differs from its category's."""
    config = model.config  # ours, or any config with num_labels (a transformers model's has no category_ids)
    names = dict(zip(dataset.label_to_category_id, dataset.category_names))
    recorded = getattr(config, "category_ids", None)
    categories = list(recorded) if recorded is not None else dataset.label_to_category_id
    if len(categories) != config.num_labels:
        raise ValueError(
            f"the model has {config.num_labels} labels but {dataset.annotation_file} has {len(categories)} "
            "categories (and the model records no category ids of its own)"
        )
    missing = [c for c in categories if c not in names]
    if missing:
        raise ValueError(
            f"the model predicts category ids {missing} that {dataset.annotation_file} does not have "
            f"(its categories: {dataset.label_to_category_id})"
        )
    id2label = getattr(config, "id2label", None)
    if id2label:
        differ = [
            f"label {label} is {id2label[label]!r}, category {c} is {names[c]!r}"
            for label, c in enumerate(categories)
            if label in id2label and id2label[label] != names[c]
        ]
        if differ:
            warnings.warn(
                f"the model's class names differ from those of {dataset.annotation_file}: {'; '.join(differ[:5])}"
                + (f" (and {len(differ) - 5} more)" if len(differ) > 5 else ""),
                stacklevel=2,
            )
    return categories


@torch.no_grad()
def model_outputs(
    model: nn.Module,
    dataset,
    batch_size: int,
    device: torch.device,
    amp: str = "auto",
    num_workers: int = 0,
    indices: Sequence[int] | None = None,
) -> Iterator[tuple[dict, object]]:
    """(batch, model output) over `dataset` (or its items `indices`) in eval mode, without gradients, under the
    run's autocast; batches left empty by unreadable images (on_bad="skip") are passed over. The model's mode is
    restored at the end."""
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
    # A private generator: evaluating in the middle of training must not draw from the RNG that dropout uses.
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, generator=torch.Generator()
    )
    amp_dtype = autocast_dtype(amp, device)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if "pixel_values" not in batch:
                continue
            with autocast(device, amp_dtype):
                output = model(batch["pixel_values"].to(device), batch["pixel_mask"].to(device))
            yield batch, output
    finally:
        model.train(was_training)


def predict(
    model: nn.Module,
    dataset: CocoDetection,
    batch_size: int,
    device: torch.device,
    amp: str = "auto",
    num_workers: int = 0,
    indices: Sequence[int] | None = None,
    categories: Sequence[int] | None = None,
) -> tuple[list[dict], list[int]]:
    """COCO result entries of `model` on `dataset` (or on the items `indices`), and the ids of the images predicted
    (an unreadable image skipped under on_bad="skip" is not among them).

    categories: the COCO category id of each model label (default: label_categories).
    """
    categories = label_categories(model, dataset) if categories is None else categories
    results, image_ids = [], []
    for batch, output in model_outputs(model, dataset, batch_size, device, amp, num_workers, indices):
        image_ids += batch["image_ids"].tolist()
        results += detections_to_coco(
            output.logits, output.pred_boxes, batch["image_ids"].tolist(), batch["orig_sizes"].to(device), categories
        )
    return results, image_ids


def evaluate(
    model: nn.Module,
    dataset: CocoDetection,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    amp: str = "auto",
    num_workers: int = 0,
    verbose: bool = False,
) -> dict:
    """COCO mAP of `model` on `dataset`, over the images it could read (with on_bad="skip" an unreadable image is
    left out, not counted as missed objects). Under torch.distributed each process predicts its share of the images
    and every process gets the metrics of the whole set.

    Returns:
        METRIC_NAMES -> value, plus "num_images" (evaluated), "num_skipped" (unreadable) and "num_detections".
    """
    device = torch.device(device)
    categories = label_categories(model, dataset)
    rank, world_size = rank_and_world_size()
    shares = range(rank, len(dataset), world_size)
    results, image_ids = predict(model, dataset, batch_size, device, amp, num_workers, shares, categories)
    if is_distributed():
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (results, image_ids))
        results = [entry for part, _ in gathered for entry in part]
        image_ids = [image_id for _, part in gathered for image_id in part]
    metrics = [None]
    if rank == 0:
        metrics[0] = {
            **coco_metrics(dataset.coco, results, image_ids, verbose),
            "num_images": len(image_ids),
            "num_skipped": len(dataset) - len(image_ids),
            "num_detections": len(results),
        }
    if is_distributed():
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0]


def write_metrics(metrics: dict, path: str) -> None:
    """Write `metrics` as JSON (folder created if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
