"""Data: padded targets, COCO-format datasets, transforms, collate, and the built-in synthetic dataset."""

from .targets import PAD_BOX, PAD_LABEL, is_padded, pad_targets

__all__ = ["PAD_BOX", "PAD_LABEL", "is_padded", "pad_targets"]
