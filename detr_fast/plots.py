"""Pictures of a training run: the loss and mAP curves, and detections or panoptic maps on validation images
(matplotlib, from the `plot` extra)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .data.datasets import CocoImages, CocoPanoptic
from .evaluate import label_categories, predict
from .processing.annotations import read_segment_map
from .segmentation_metrics import panoptic_maps

BOX_COLOURS = ("tab:red", "tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the plots need matplotlib: pip install 'detr-fast[plot]'") from error
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


# The validation metrics a history may record, and their names in the plot.
VALIDATION_CURVES = {
    "map": "mAP@[.5:.95]",
    "map50": "mAP@0.5",
    "mask_map": "mask mAP",
    "pq": "PQ",
    "pq_things": "PQ things",
    "pq_stuff": "PQ stuff",
}


def plot_curves(history: Sequence[dict], path: str) -> None:
    """Loss terms against step (left) and the validation metrics (mAP, mask mAP, PQ) against step (right), as a
    PNG.

    Args:
        history: training records ({"step", "loss", "loss_ce", "loss_bbox", "loss_giou", ...}) and evaluation
            records ({"step", "map", "map50"}, "mask_map" or {"pq", "pq_things", "pq_stuff"}) in any order.
    """
    plt = _pyplot()
    losses = [r for r in history if "loss" in r]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "-"), ("loss_ce", "--"), ("loss_bbox", "--"), ("loss_giou", "--")):
        if losses and key in losses[0]:
            left.plot([r["step"] for r in losses], [r[key] for r in losses], style, label=key)
    left.set(xlabel="step", ylabel="loss: weighted total, last-layer terms", title="training loss")
    left.set_yscale("log")
    left.legend()
    for (key, label), marker in zip(VALIDATION_CURVES.items(), "os^vD<", strict=True):
        evals = [r for r in history if key in r]
        if evals:
            right.plot([r["step"] for r in evals], [r[key] for r in evals], marker + "-", label=label)
    right.set(xlabel="step", ylabel="COCO mAP, PQ", title="validation", ylim=(0, 1))
    if right.lines:  # a run without evaluation leaves the panel empty
        right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_detections(
    images: Sequence[Image.Image],
    detections: Sequence[dict],
    ground_truths: Sequence[dict],
    class_names: Sequence[str],
    path: str,
    columns: int = 4,
) -> None:
    """A grid of images with ground-truth boxes (dashed white) and detections (coloured, "class score").

    Args:
        detections, ground_truths: per image {"boxes" [K, 4] xyxy pixels, "labels" [K]} (detections also
            "scores" [K]).
    """
    plt = _pyplot()
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, detection, truth in zip(axes.flat, images, detections, ground_truths):
        ax.imshow(image)
        for x0, y0, x1, y1 in truth["boxes"].tolist():
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", ls="--", lw=1))
        for (x0, y0, x1, y1), label, score in zip(
            detection["boxes"].tolist(), detection["labels"].tolist(), detection["scores"].tolist()
        ):
            colour = BOX_COLOURS[label % len(BOX_COLOURS)]
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=2))
            ax.text(
                x0,
                y0,
                f"{class_names[label]} {score:.2f}",
                color="white",
                fontsize=7,
                va="bottom",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "lw": 0},
            )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_validation_detections(
    model: torch.nn.Module,
    dataset: CocoImages,
    path: str,
    device: torch.device | str = "cpu",
    num_images: int = 8,
    threshold: float = 0.5,
    amp: str = "auto",
) -> None:
    """Run `model` on the first `num_images` images of `dataset` and draw its detections scoring above
    `threshold` next to the ground truth."""
    indices = range(min(num_images, len(dataset)))
    categories = label_categories(model, dataset)
    results, _ = predict(
        model, dataset, len(indices), torch.device(device), amp, indices=indices, categories=categories
    )
    category_to_label = {c: i for i, c in enumerate(categories)}
    images, detections, truths = [], [], []
    for index in indices:
        record = dataset.images[index]
        kept = [r for r in results if r["image_id"] == record["id"] and r["score"] > threshold]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in kept)]).reshape(-1, 4)
        labels = torch.tensor([category_to_label[r["category_id"]] for r in kept], dtype=torch.long)
        detections.append({"boxes": boxes, "scores": torch.tensor([r["score"] for r in kept]), "labels": labels})
        target = dataset.target_of(index)  # boxes xyxy in the file's pixels, of detection or panoptic data
        truths.append({"boxes": target["boxes"], "labels": target["class_labels"]})
        images.append(dataset.load_image(index))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plot_detections(images, detections, truths, dataset.category_names, path)


def colour_segments(segment_map: np.ndarray, segments: Sequence[dict]) -> np.ndarray:
    """A panoptic map as an RGB picture: each category its own colour (tab20, the ten hues before their light
    variants), the instances of a category in shades of it, pixels of no segment black.

    Args:
        segment_map: [H, W] segment ids; segments: [{"id", "category_id"}].
    Returns:
        [H, W, 3] float in [0, 1].
    """
    plt = _pyplot()
    palette = plt.get_cmap("tab20")
    picture = np.zeros((*segment_map.shape, 3))
    seen: dict[int, int] = {}
    for segment in segments:
        category = segment["category_id"]
        shade = 1.0 - 0.25 * (seen.get(category, 0) % 3)  # the second and third instance darker
        seen[category] = seen.get(category, 0) + 1
        colour = palette((2 * category) % 20 + (category // 10) % 2)[:3]
        picture[segment_map == segment["id"]] = np.asarray(colour) * shade
    return picture


def plot_panoptic(
    images: Sequence[Image.Image],
    truths: Sequence[tuple[np.ndarray, Sequence[dict]]],
    predictions: Sequence[tuple[np.ndarray, Sequence[dict]]],
    category_names: dict[int, str],
    path: str,
) -> None:
    """One row per image: the image, its ground-truth panoptic map and the predicted one, each segment named at
    its pixel nearest its centre (colour_segments' colours: the same category, the same colour in both maps).

    Args:
        truths, predictions: per image (segment id map [H, W], segments [{"id", "category_id"}]).
        category_names: category id -> name.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(len(images), 3, figsize=(9, 3 * len(images)), squeeze=False)
    for row, image, truth, prediction in zip(axes, images, truths, predictions):
        row[0].imshow(image)
        for ax, (segment_map, segments), title in zip(row[1:], (truth, prediction), ("ground truth", "predicted")):
            ax.imshow(colour_segments(segment_map, segments), interpolation="nearest")
            for segment in segments:
                ys, xs = np.nonzero(segment_map == segment["id"])
                if len(ys):
                    name = category_names.get(segment["category_id"], str(segment["category_id"]))
                    nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)  # inside a curved segment
                    ax.text(xs[nearest], ys[nearest], name, color="white", fontsize=7, ha="center", va="center")
            ax.set_title(title, fontsize=9)
        for ax in row:
            ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_validation_panoptic(
    model: torch.nn.Module,
    dataset: CocoPanoptic,
    path: str,
    device: torch.device | str = "cpu",
    num_images: int = 6,
    amp: str = "auto",
) -> None:
    """Run `model` on the first `num_images` images of `dataset` and draw its panoptic maps (as evaluate_panoptic
    scores them: segmentation_metrics.panoptic_maps) beside the ground truth."""
    indices = range(min(num_images, len(dataset)))
    annotations = {annotation["image_id"]: annotation for annotation in dataset.panoptic["annotations"]}
    names = dict(zip(dataset.label_to_category_id, dataset.category_names))
    predicted = {
        image_id: (pred_map, segments)
        for image_id, pred_map, segments in panoptic_maps(
            model, dataset, len(indices), torch.device(device), amp, indices=indices
        )
    }
    images, truths, predictions = [], [], []
    for index in indices:
        record = dataset.images[index]
        if record["id"] not in predicted:  # unreadable, skipped
            continue
        images.append(dataset.load_image(index))
        truths.append((read_segment_map(record["png"]), annotations[record["id"]]["segments_info"]))
        predictions.append(predicted[record["id"]])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plot_panoptic(images, truths, predictions, names, path)
