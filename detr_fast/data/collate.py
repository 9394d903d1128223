"""Batching: pad the normalized images to the batch maximum with a pixel mask and pad the targets, as DETR's
collate does."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..processing.transforms import normalize_and_pad
from .targets import pad_targets


def pad_images(images: Sequence[torch.Tensor], size_divisor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad already normalized [C, H_i, W_i] images at the bottom/right to a common size (the image processor's
    normalize-and-pad, with nothing left to normalize).

    Returns:
        pixel_values [B, C, H, W] float32 (zeros in the padding) and pixel_mask [B, H, W] int64 (1 = real pixel).
    """
    if not images:
        raise ValueError("pad_images: got no images")
    return normalize_and_pad(images, mean=None, std=None, rescale_factor=None, size_divisor=size_divisor)


def collate(
    samples: Sequence[tuple[torch.Tensor, dict] | None], size_divisor: int = 1, max_targets: int | None = None
) -> dict:
    """A DataLoader collate_fn for detection samples.

    Args:
        samples: (image [3, H_i, W_i], target) pairs from a dataset; the target holds "class_labels" [M_i],
            "boxes" [M_i, 4] normalized cxcywh, "image_id", "orig_size" and "size" ((height, width) before and
            after the transforms), and for segmentation "masks" [M_i, H_i, W_i] bool. None marks a sample the
            dataset skipped (an unreadable image with on_bad="skip").
        size_divisor: pad height and width up to a multiple of this.
        max_targets: pad the targets to this many slots (fixed shapes across steps); default the batch maximum.
    Returns:
        {"pixel_values" [B, 3, H, W], "pixel_mask" [B, H, W], "labels" (padded targets: class_labels [B, M],
        boxes [B, M, 4], mask [B, M], and masks [B, M, H, W] bool padded as the images), "image_ids" [B],
        "orig_sizes" [B, 2], "sizes" [B, 2], "num_skipped" int}.
        B counts the samples that were not skipped and may be 0.
    """
    kept = [sample for sample in samples if sample is not None]
    batch = {"num_skipped": len(samples) - len(kept), "image_ids": torch.tensor([t["image_id"] for _, t in kept])}
    if not kept:
        return batch
    batch["pixel_values"], batch["pixel_mask"] = pad_images([image for image, _ in kept], size_divisor)
    batch["labels"] = pad_targets(
        [target for _, target in kept], max_targets, mask_size=tuple(batch["pixel_values"].shape[-2:])
    )
    batch["orig_sizes"] = torch.tensor([target["orig_size"] for _, target in kept])  # [B, 2] (h, w)
    batch["sizes"] = torch.tensor([target["size"] for _, target in kept])  # [B, 2]
    return batch
