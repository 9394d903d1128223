"""Batching: normalize images, pad them to the batch maximum with a pixel mask and pad the targets, as DETR's
collate does."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .targets import pad_targets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = np.array(IMAGENET_MEAN, dtype=np.float32) * 255
_STD_255 = np.array(IMAGENET_STD, dtype=np.float32) * 255


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32, ImageNet-normalized."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    # In numpy: on small images the per-op overhead of torch in a data worker costs more than the arithmetic.
    array = (array - _MEAN_255) / _STD_255
    return torch.from_numpy(array).permute(2, 0, 1)  # [3, H, W]


def pad_images(images: Sequence[torch.Tensor], size_divisor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [3, H_i, W_i] images at the bottom/right to a common size.

    Returns:
        pixel_values [B, 3, H, W] (zeros in the padding) and pixel_mask [B, H, W] int64 (1 = real pixel).
    """
    if not images:
        raise ValueError("pad_images: got no images")
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    height, width = (-(-height // size_divisor) * size_divisor, -(-width // size_divisor) * size_divisor)
    pixel_values = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    pixel_mask = torch.zeros((len(images), height, width), dtype=torch.int64)
    for i, image in enumerate(images):
        pixel_values[i, :, : image.shape[1], : image.shape[2]] = image
        pixel_mask[i, : image.shape[1], : image.shape[2]] = 1
    return pixel_values, pixel_mask


def collate(
    samples: Sequence[tuple[torch.Tensor, dict] | None], size_divisor: int = 1, max_targets: int | None = None
) -> dict:
    """A DataLoader collate_fn for detection samples.

    Args:
        samples: (image [3, H_i, W_i], target) pairs from a dataset; the target holds "class_labels" [M_i],
            "boxes" [M_i, 4] normalized cxcywh, "image_id", "orig_size" and "size" ((height, width) before and
            after the transforms). None marks a sample the dataset skipped (an unreadable image with on_bad="skip").
        size_divisor: pad height and width up to a multiple of this.
        max_targets: pad the targets to this many slots (fixed shapes across steps); default the batch maximum.
    Returns:
        {"pixel_values" [B, 3, H, W], "pixel_mask" [B, H, W], "labels" (padded targets: class_labels [B, M],
        boxes [B, M, 4], mask [B, M]), "image_ids" [B], "orig_sizes" [B, 2], "sizes" [B, 2], "num_skipped" int}.
        B counts the samples that were not skipped and may be 0.
    """
    kept = [sample for sample in samples if sample is not None]
    batch = {"num_skipped": len(samples) - len(kept), "image_ids": torch.tensor([t["image_id"] for _, t in kept])}
    if not kept:
        return batch
    batch["pixel_values"], batch["pixel_mask"] = pad_images([image for image, _ in kept], size_divisor)
    batch["labels"] = pad_targets([target for _, target in kept], max_targets)
    batch["orig_sizes"] = torch.tensor([target["orig_size"] for _, target in kept])  # [B, 2] (h, w)
    batch["sizes"] = torch.tensor([target["size"] for _, target in kept])  # [B, 2]
    return batch
