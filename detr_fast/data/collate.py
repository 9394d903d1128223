"""Batching: normalize images and pad them to the batch maximum with a pixel mask, as DETR's collate does."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32, ImageNet-normalized."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    tensor = torch.from_numpy(array).permute(2, 0, 1)  # [3, H, W]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (tensor - mean) / std


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
