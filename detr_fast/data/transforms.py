"""DETR's data augmentation on (PIL image, target) pairs: horizontal flip, multi-scale resize with a maximum size,
random size crop, and the final conversion to a normalized tensor with normalized cxcywh boxes.

A target is a dict with "boxes" [M, 4] float32 xyxy in pixels and "class_labels" [M] int64 (other keys are carried
along). Every random transform draws from the `rng` (a numpy Generator) it is called with, so a sample's
augmentation is a function of the seed the dataset derives for it: runs, workers and resumed runs see the same
images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..reference.box_ops import corners_to_center
from .collate import IMAGENET_MEAN, IMAGENET_STD, image_to_tensor

Sample = tuple[Image.Image, dict]


def hflip(image: Image.Image, target: dict) -> Sample:
    """Mirror the image left-right; boxes [M, 4] xyxy follow."""
    width = image.width
    boxes = target["boxes"]
    flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)  # [M, 4]
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), {**target, "boxes": flipped}


def scaled_size(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(height, width) with the shorter side `size`, unless the longer side would then exceed `max_size`, in which
    case the longer side is about `max_size`: DETR's rule exactly, aspect ratio kept. DETR rounds the capped
    shorter side and truncates the longer one, so the longer side is at most max_size except for extreme aspect
    ratios, where rounding the short side up overshoots (2 x 1000 at max_size 1333 gives 3 x 1500)."""
    if max_size is not None:
        short, long = min(height, width), max(height, width)
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize(image: Image.Image, target: dict, size: int, max_size: int | None = None) -> Sample:
    """Resize so the shorter side is `size` (capped by `max_size` on the longer side); boxes are scaled."""
    height, width = scaled_size(image.height, image.width, size, max_size)
    scale = torch.tensor([width / image.width, height / image.height] * 2)
    return image.resize((width, height), Image.Resampling.BILINEAR), {**target, "boxes": target["boxes"] * scale}


def crop(image: Image.Image, target: dict, top: int, left: int, height: int, width: int) -> Sample:
    """Cut the region (top, left, height, width); boxes are clipped to it and those left with no area dropped."""
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)  # [M, 4]
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height], dtype=torch.float32))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # [M]
    cropped = {
        key: value[keep] if key in ("boxes", "class_labels", "area", "iscrowd") else value
        for key, value in target.items()
    }
    cropped["boxes"] = boxes[keep]
    return image.crop((left, top, left + width, top + height)), cropped


class Compose:
    """Apply transforms in order, each with the same rng."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator) -> Sample:
        for transform in self.transforms:
            image, target = transform(image, target, rng)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator) -> Sample:
        return hflip(image, target) if rng.random() < self.p else (image, target)


class RandomResize:
    """Resize the shorter side to one of `sizes`, chosen at random (multi-scale training)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        if not sizes:
            raise ValueError("RandomResize: sizes is empty")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator) -> Sample:
        return resize(image, target, self.sizes[int(rng.integers(len(self.sizes)))], self.max_size)


class RandomSizeCrop:
    """Crop a random region whose sides are drawn from [min_size, max_size] (and at most the image's)."""

    def __init__(self, min_size: int, max_size: int):
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator) -> Sample:
        width = int(rng.integers(min(self.min_size, image.width), min(image.width, self.max_size) + 1))
        height = int(rng.integers(min(self.min_size, image.height), min(image.height, self.max_size) + 1))
        top = int(rng.integers(image.height - height + 1))
        left = int(rng.integers(image.width - width + 1))
        return crop(image, target, top, left, height, width)


class RandomSelect:
    """Apply `first` with probability p, else `second`."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator) -> Sample:
        return self.first(image, target, rng) if rng.random() < self.p else self.second(image, target, rng)


class ToModelInput:
    """The last step: the image as an ImageNet-normalized [3, H, W] tensor, boxes as cxcywh divided by the image
    size, and target["size"] = (H, W) as fed to the model."""

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        scale = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
        boxes = corners_to_center(target["boxes"]) / scale  # [M, 4] normalized cxcywh
        return image_to_tensor(image), {**target, "boxes": boxes, "size": (image.height, image.width)}


def train_transforms(
    scales: Sequence[int],
    max_size: int | None,
    crop_resize: Sequence[int] | None = None,
    crop_size: tuple[int, int] | None = None,
    flip: float = 0.5,
) -> Compose:
    """DETR's training augmentation: flip, then either a multi-scale resize (shorter side one of `scales`, longer
    side at most `max_size`; no resize when `scales` is empty), or, with probability 1/2 when `crop_size` is given,
    a resize to one of `crop_resize` (if given), a random crop with sides in `crop_size`, and the multi-scale
    resize. COCO: scales 480..800 step 32, max_size 1333, crop_resize (400, 500, 600), crop_size (384, 600)."""
    multi_scale = [RandomResize(scales, max_size)] if scales else []
    steps: list = [RandomHorizontalFlip(flip)] if flip > 0 else []
    if crop_size:
        pre_crop = [RandomResize(crop_resize)] if crop_resize else []
        steps.append(RandomSelect(Compose(multi_scale), Compose([*pre_crop, RandomSizeCrop(*crop_size), *multi_scale])))
    else:
        steps += multi_scale
    return Compose([*steps, ToModelInput()])


def eval_transforms(size: int, max_size: int) -> Compose:
    """Evaluation: resize the shorter side to `size` (longer side at most `max_size`), no randomness."""
    return Compose([RandomResize([size], max_size), ToModelInput()])


PREPROCESSOR_CONFIG = "preprocessor_config.json"


def write_preprocessor_config(directory: str, size: int | None, max_size: int) -> None:
    """Record the evaluation preprocessing beside a model's weights, as transformers' DetrImageProcessor saves it
    (preprocessor_config.json): resize the shorter side to `size` (none when None) with the longer side at most
    `max_size`, bilinear; rescale to [0, 1]; normalize with ImageNet's mean and std; pad."""
    values = {
        "image_processor_type": "DetrImageProcessor",
        "format": "coco_detection",
        "do_resize": size is not None,
        "size": {"shortest_edge": size, "longest_edge": max_size} if size is not None else None,
        "resample": int(Image.Resampling.BILINEAR),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_annotations": True,
        "do_pad": True,
    }
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, PREPROCESSOR_CONFIG), "w") as f:
        json.dump(values, f, indent=2)


def read_eval_resize(directory: str) -> dict | None:
    """The evaluation resize recorded in `directory`'s preprocessor_config.json, {"size": shorter side or None (no
    resize), "max_size": longer side at most}, or None when the directory records none. ValueError naming the file
    for a resize this pipeline does not express (a fixed height and width)."""
    path = os.path.join(directory, PREPROCESSOR_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        values = json.load(f)
    size = values.get("size") or {}
    if not values.get("do_resize", True):
        return {"size": None, "max_size": size.get("longest_edge") or 1333}
    if "shortest_edge" not in size:
        raise ValueError(f"{path}: size {size} is not {{shortest_edge, longest_edge}}, the resize detr_fast evaluates")
    return {"size": size["shortest_edge"], "max_size": size.get("longest_edge") or 1333}
