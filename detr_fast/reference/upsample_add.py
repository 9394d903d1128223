"""Reference of `upsample_add`: a fusion stage of DETR's mask head adds each query's running map, upsampled
(nearest) to an FPN level's size, to its image's adapted FPN features."""

import torch
import torch.nn.functional as F


def upsample_add(features: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
    """Nearest-upsample every query's map to the FPN level's size and add the image's features.

    Args:
        features: [B, Q, C, h, w], per query.
        adapted: [B, C, H, W], per image (the FPN level after its 1x1 adapter), broadcast over the queries.
    Returns:
        [B, Q, C, H, W], channels-last per map (memory order b, q, y, x, c): what the 3x3 convolution that follows
        reads fastest. The sum is added in place into the upsampled maps, so one B x Q-sized buffer is written.
    """
    batch, queries = features.shape[:2]
    maps = features.flatten(0, 1).contiguous(memory_format=torch.channels_last)  # [BQ, C, h, w]
    upsampled = F.interpolate(maps, size=adapted.shape[-2:], mode="nearest")  # [BQ, C, H, W], channels last
    return upsampled.unflatten(0, (batch, queries)).add_(adapted[:, None])  # [B, Q, C, H, W]


def upsample_add_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of upsample_add's [B, Q, C, H, W] result: channels-last per map (memory order b, q, y, x, c)."""
    _batch, queries, channels, height, width = shape
    return (queries * height * width * channels, height * width * channels, 1, width * channels, channels)
