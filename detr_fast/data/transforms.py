"""DETR's data augmentation on (image, target) pairs, the image a uint8 [3, H, W] tensor (a PIL image is converted
first): horizontal flip, multi-scale resize with a maximum size, random size crop, and the final normalization
with normalized cxcywh boxes. The resize and the normalization are detr_fast.processing's, the code the image
processor and evaluation run.

A target is a dict with "boxes" [M, 4] float32 xyxy in pixels and "class_labels" [M] int64, and for segmentation
"masks" [M, H, W] bool, which follow every geometric transform (resized by the image processor's nearest-exact
rule: processing.annotations.resize_masks); other keys are carried along. Every random transform draws from the
`rng` (a numpy Generator) it is called with, so a sample's augmentation is a function of the seed the dataset derives
for it: runs, workers and resumed runs see the same images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..processing import transforms as pixels
from ..processing.annotations import resize_masks
from ..reference.box_ops import corners_to_center

Sample = tuple[torch.Tensor, dict]


def hflip(image: torch.Tensor, target: dict) -> Sample:
    """Mirror the image [3, H, W] left-right; boxes [M, 4] xyxy follow."""
    width = image.shape[-1]
    boxes = target["boxes"]
    flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)  # [M, 4]
    target = {**target, "boxes": flipped}
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def scaled_size(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(height, width) with the shorter side `size`, unless the longer side would then exceed `max_size`, in which
    case the longer side is about `max_size`, aspect ratio kept: the rule of transformers' DetrImageProcessor
    (processing.transforms.resized_size), which differs from the original DETR's by at most a pixel on the longer
    side of extreme aspect ratios (DETR's rounding could pass max_size)."""
    return pixels.resized_size(height, width, {"shortest_edge": size, "longest_edge": max_size})


def resize(image: torch.Tensor, target: dict, size: int, max_size: int | None = None) -> Sample:
    """Resize so the shorter side is `size` (capped by `max_size` on the longer side), with the image processor's
    resize; boxes are scaled."""
    old_height, old_width = image.shape[-2:]
    height, width = scaled_size(old_height, old_width, size, max_size)
    scale = torch.tensor([width / old_width, height / old_height] * 2)
    target = {**target, "boxes": target["boxes"] * scale}
    if "masks" in target:
        target["masks"] = resize_masks(target["masks"], height, width)
    return pixels.resize(image, height, width), target


def crop(image: torch.Tensor, target: dict, top: int, left: int, height: int, width: int) -> Sample:
    """Cut the region (top, left, height, width); boxes are clipped to it and those left with no area dropped, with
    their masks (masks are cut too)."""
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)  # [M, 4]
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height], dtype=torch.float32))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # [M]
    cropped = {
        key: value[keep] if key in ("boxes", "class_labels", "area", "iscrowd", "masks") else value
        for key, value in target.items()
    }
    cropped["boxes"] = boxes[keep]
    if "masks" in cropped:
        cropped["masks"] = cropped["masks"][:, top : top + height, left : left + width]
    return image[:, top : top + height, left : left + width], cropped


class Compose:
    """Apply transforms in order, each with the same rng."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor | Image.Image, target: dict, rng: np.random.Generator) -> Sample:
        image = pixels.to_uint8_tensor(image)
        for transform in self.transforms:
            image, target = transform(image, target, rng)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict, rng: np.random.Generator) -> Sample:
        return hflip(image, target) if rng.random() < self.p else (image, target)


class RandomResize:
    """Resize the shorter side to one of `sizes`, chosen at random (multi-scale training)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        if not sizes:
            raise ValueError("RandomResize: sizes is empty")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: torch.Tensor, target: dict, rng: np.random.Generator) -> Sample:
        return resize(image, target, self.sizes[int(rng.integers(len(self.sizes)))], self.max_size)


class RandomSizeCrop:
    """Crop a random region whose sides are drawn from [min_size, max_size] (and at most the image's)."""

    def __init__(self, min_size: int, max_size: int):
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: torch.Tensor, target: dict, rng: np.random.Generator) -> Sample:
        image_height, image_width = image.shape[-2:]
        width = int(rng.integers(min(self.min_size, image_width), min(image_width, self.max_size) + 1))
        height = int(rng.integers(min(self.min_size, image_height), min(image_height, self.max_size) + 1))
        top = int(rng.integers(image_height - height + 1))
        left = int(rng.integers(image_width - width + 1))
        return crop(image, target, top, left, height, width)


class RandomSelect:
    """Apply `first` with probability p, else `second`."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: torch.Tensor, target: dict, rng: np.random.Generator) -> Sample:
        return self.first(image, target, rng) if rng.random() < self.p else self.second(image, target, rng)


class ToModelInput:
    """The last step: the image as an ImageNet-normalized float32 [3, H, W] tensor (the image processor's rescale and
    normalization), boxes as cxcywh divided by the image size (DETR's convention: the unpadded image), and
    target["size"] = (H, W) as fed to the model. Takes a PIL image too."""

    def __call__(
        self, image: torch.Tensor | Image.Image, target: dict, rng: np.random.Generator | None
    ) -> tuple[torch.Tensor, dict]:
        image = pixels.to_uint8_tensor(image)
        height, width = image.shape[-2:]
        scale = torch.tensor([width, height] * 2, dtype=torch.float32)
        boxes = corners_to_center(target["boxes"]) / scale  # [M, 4] normalized cxcywh
        normalized = pixels.normalize_and_pad([image])[0][0]  # [3, H, W]
        return normalized, {**target, "boxes": boxes, "size": (height, width)}


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
