"""The built-in synthetic detection dataset: coloured shapes on varied backgrounds, deterministic from a seed.

Each image holds a few filled shapes (the classes: rectangle, ellipse, triangle, cross) in random colours, sizes and
aspect ratios over a background that is a random two-colour gradient with noise and stripes; later shapes may
partly cover earlier ones. The class is the shape, never the colour, so a detector has to look at form.
`write_coco` writes a split as real COCO files (PNG images + instances JSON), so the synthetic set goes through the
same dataset, evaluation and pycocotools code as any COCO-format data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..processing.annotations import id_to_rgb

CLASSES = ("rectangle", "ellipse", "triangle", "cross")


@dataclass(frozen=True)
class SyntheticSpec:
    """How a synthetic split is generated."""

    min_size: int = 96  # image side lengths are drawn from [min_size, max_size]
    max_size: int = 160
    min_objects: int = 1
    max_objects: int = 5
    min_object_fraction: float = 0.15  # object side / image side
    max_object_fraction: float = 0.5
    max_covered: float = 0.5  # a new shape may cover at most this fraction of an earlier shape's box


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[H, W, 3] uint8: a two-colour gradient in a random direction, with stripes and noise."""
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    t = (np.cos(angle) * xs / width + np.sin(angle) * ys / height + 1) / 2  # [H, W] in [0, 1]
    image = start + (end - start) * t[..., None]
    if rng.random() < 0.5:
        period = rng.uniform(6, 24)
        image += 18 * np.sin(2 * np.pi * (xs * np.cos(angle + 1) + ys * np.sin(angle + 1)) / period)[..., None]
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _covered_fraction(box: tuple[float, float, float, float], later: tuple[float, float, float, float]) -> float:
    x0, y0, x1, y1 = max(box[0], later[0]), max(box[1], later[1]), min(box[2], later[2]), min(box[3], later[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    return inter / ((box[2] - box[0]) * (box[3] - box[1]))


def _free_box(
    rng: np.random.Generator, spec: SyntheticSpec, boxes: list, height: int, width: int
) -> tuple[int, int, int, int] | None:
    """Rejection-sample (20 tries) a box xyxy that covers at most spec.max_covered of every earlier box, so that no
    object is hidden; None when every try fails."""
    for _attempt in range(20):
        w = rng.uniform(spec.min_object_fraction, spec.max_object_fraction) * width
        h = rng.uniform(spec.min_object_fraction, spec.max_object_fraction) * height
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = (round(x0), round(y0), round(x0 + w), round(y0 + h))
        if all(_covered_fraction(b, box) <= spec.max_covered for b in boxes):
            return box
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, label: int, box: tuple[float, float, float, float], colour) -> None:
    x0, y0, x1, y1 = box
    if CLASSES[label] == "rectangle":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif CLASSES[label] == "ellipse":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif CLASSES[label] == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=colour)
    else:  # cross: a vertical and a horizontal bar, each a third of the box wide
        w, h = x1 - x0, y1 - y0
        draw.rectangle([x0 + w / 3, y0, x1 - w / 3 - 1, y1 - 1], fill=colour)
        draw.rectangle([x0, y0 + h / 3, x1 - 1, y1 - h / 3 - 1], fill=colour)


def render(index: int, seed: int = 0, spec: SyntheticSpec = SyntheticSpec()) -> tuple[Image.Image, list[dict]]:
    """Image `index` of the synthetic set `seed`.

    Returns:
        (RGB PIL image, annotations): one dict per object with "bbox" [x, y, w, h] in pixels (COCO format) and
        "category_id" (0-based index into CLASSES).
    """
    rng = np.random.default_rng([seed, index])
    height, width = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, 2))
    image = Image.fromarray(_background(rng, height, width))
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[float, float, float, float]] = []
    annotations = []
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        box = _free_box(rng, spec, boxes, height, width)
        if box is None:
            continue
        label = int(rng.integers(len(CLASSES)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        _draw_shape(draw, label, box, colour)
        boxes.append(box)
        annotations.append({"bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "category_id": label})
    return image, annotations


def render_target(index: int, seed: int = 0, spec: SyntheticSpec = SyntheticSpec()) -> tuple[Image.Image, dict]:
    """Image `index` of the synthetic set `seed` with its target as the transforms take it (no files, no
    pycocotools): {"image_id": index, "boxes" [M, 4] float32 xyxy pixels, "class_labels" [M] int64,
    "orig_size": (height, width)}."""
    image, objects = render(index, seed, spec)
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (o["bbox"] for o in objects)], dtype=torch.float32)
    labels = torch.tensor([o["category_id"] for o in objects], dtype=torch.int64)
    return image, {
        "image_id": index,
        "boxes": boxes.reshape(-1, 4),
        "class_labels": labels,
        "orig_size": (image.height, image.width),
    }


def write_coco(root: str, split: str, num_images: int, seed: int, spec: SyntheticSpec = SyntheticSpec()) -> str:
    """Write `num_images` synthetic images as PNGs in root/split/ and their annotations as
    root/annotations/instances_<split>.json (COCO format, category ids 1..len(CLASSES)). Returns the JSON path.
    Rewrites nothing when the JSON already exists for the same arguments."""
    image_dir = os.path.join(root, split)
    json_path = os.path.join(root, "annotations", f"instances_{split}.json")
    stamp = {"num_images": num_images, "seed": seed, "spec": spec.__dict__}
    if os.path.exists(json_path):
        with open(json_path) as f:
            if json.load(f).get("info", {}).get("detr_fast_synthetic") == stamp:
                return json_path
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, objects = render(index, seed, spec)
        file_name = f"{index:06d}.png"
        image.save(os.path.join(image_dir, file_name))
        images.append({"id": index + 1, "file_name": file_name, "width": image.width, "height": image.height})
        for obj in objects:
            x, y, w, h = obj["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": obj["category_id"] + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    coco = {
        "info": {"detr_fast_synthetic": stamp},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    temporary = json_path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(coco, f)
    os.replace(temporary, json_path)  # the JSON appears only once every image is written
    return json_path


# ---------------------------------------------------------------------------------------------- panoptic variant

STUFF = ("sky", "grass", "water")  # background regions, told apart by texture (their colours are random)


def _stuff_texture(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """[H, W, 3] float: a random base colour with the texture of its kind: sky a smooth vertical gradient, grass
    fine vertical blades, water horizontal waves."""
    base = rng.uniform(40, 215, 3)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    if kind == "sky":
        pattern = 40 * (ys / height - 0.5)
    elif kind == "grass":
        pattern = 35 * np.sign(np.sin(2 * np.pi * xs / rng.uniform(3, 5) + rng.uniform(0, 6)))
    else:
        pattern = 30 * np.sin(2 * np.pi * ys / rng.uniform(5, 9) + 0.6 * np.sin(2 * np.pi * xs / 23))
    return base + pattern[..., None] + rng.normal(0, 6, (height, width, 3))


def render_panoptic(
    index: int, seed: int = 0, spec: SyntheticSpec = SyntheticSpec()
) -> tuple[Image.Image, np.ndarray, list[dict]]:
    """Image `index` of the synthetic panoptic set `seed`: two or three stuff regions (bands of sky, grass or water
    with wavy borders, top to bottom) under the shapes of `render` (things).

    Returns:
        (RGB PIL image, segment map [H, W] int64 of segment ids, segments): one dict per segment with "id",
        "category_id" (0-based: the shapes of CLASSES, then STUFF at len(CLASSES) + j) and "isthing".
    """
    rng = np.random.default_rng([seed, index, 1])
    height, width = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, 2))
    kinds = list(rng.choice(len(STUFF), size=int(rng.integers(2, 4)), replace=False))
    ys, xs = np.mgrid[0:height, 0:width]
    borders = np.sort(rng.uniform(0.25, 0.75, len(kinds) - 1)) * height
    region = np.zeros((height, width), np.int64)
    for border in borders:
        wave = border + rng.uniform(2, 6) * np.sin(2 * np.pi * xs / rng.uniform(20, 60) + rng.uniform(0, 6))
        region += ys >= wave
    pixels = np.zeros((height, width, 3))
    for j, kind in enumerate(kinds):
        pixels = np.where((region == j)[..., None], _stuff_texture(rng, STUFF[kind], height, width), pixels)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    ids = Image.fromarray((region + 100).astype(np.int32))  # mode "I"; stuff segment ids 100, 101, 102
    segments = [{"id": 100 + j, "category_id": len(CLASSES) + int(kind), "isthing": 0} for j, kind in enumerate(kinds)]
    draw, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(ids)
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        box = _free_box(rng, spec, boxes, height, width)
        if box is None:
            continue
        label = int(rng.integers(len(CLASSES)))
        _draw_shape(draw, label, box, tuple(int(c) for c in rng.integers(0, 256, 3)))
        _draw_shape(draw_ids, label, box, len(boxes) + 1)  # thing segment ids 1, 2, ...
        segments.append({"id": len(boxes) + 1, "category_id": label, "isthing": 1})
        boxes.append(box)
    segment_map = np.asarray(ids, dtype=np.int64)
    present = set(np.unique(segment_map).tolist())
    return image, segment_map, [s for s in segments if s["id"] in present]


def panoptic_split_paths(root: str, split: str) -> tuple[str, str, str]:
    """(image folder, panoptic JSON, PNG folder) of the synthetic panoptic split `split` under root."""
    return (
        os.path.join(root, split),
        os.path.join(root, "annotations", f"panoptic_{split}.json"),
        os.path.join(root, f"panoptic_{split}"),
    )


def write_coco_panoptic(
    root: str, split: str, num_images: int, seed: int, spec: SyntheticSpec = SyntheticSpec()
) -> tuple[str, str, str]:
    """Write the synthetic panoptic split: images in root/split/, PNGs in root/panoptic_<split>/ and the JSON
    root/annotations/panoptic_<split>.json (category ids 1.. for the shapes, then the stuff). Returns (image
    folder, JSON, PNG folder); rewrites nothing when the JSON already exists for the same arguments."""
    image_dir, json_path, png_dir = panoptic_split_paths(root, split)
    stamp = {"num_images": num_images, "seed": seed, "spec": spec.__dict__}
    if os.path.exists(json_path):
        with open(json_path) as f:
            if json.load(f).get("info", {}).get("detr_fast_synthetic_panoptic") == stamp:
                return image_dir, json_path, png_dir
    for folder in (image_dir, png_dir, os.path.dirname(json_path)):
        os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, segment_map, segments = render_panoptic(index, seed, spec)
        file_name = f"{index:06d}"
        image.save(os.path.join(image_dir, file_name + ".png"))
        Image.fromarray(id_to_rgb(segment_map)).save(os.path.join(png_dir, file_name + ".png"))
        images.append({"id": index + 1, "file_name": file_name + ".png", "width": image.width, "height": image.height})
        infos = []
        for segment in segments:
            ys, xs = np.nonzero(segment_map == segment["id"])
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            infos.append({"id": segment["id"], "category_id": segment["category_id"] + 1, "iscrowd": 0,
                          "area": int(len(ys)), "bbox": bbox})  # fmt: skip
        annotations.append({"image_id": index + 1, "file_name": file_name + ".png", "segments_info": infos})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape", "isthing": 1} for i, name in enumerate(CLASSES)]
    categories += [{"id": len(CLASSES) + j + 1, "name": name, "supercategory": "stuff", "isthing": 0}
                   for j, name in enumerate(STUFF)]  # fmt: skip
    content = {"info": {"detr_fast_synthetic_panoptic": stamp}, "images": images, "annotations": annotations,
               "categories": categories}  # fmt: skip
    temporary = json_path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(content, f)
    os.replace(temporary, json_path)  # the JSON appears only once every image and PNG is written
    return image_dir, json_path, png_dir
