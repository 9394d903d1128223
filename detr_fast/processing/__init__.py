"""Images in, results out: DetrImageProcessor (transformers' interface: resize, rescale, normalize, pad, the
annotation formats, post-processing), and the tensor operations the training data pipeline shares with it."""

from .image_processor import BatchFeature, DetrImageProcessor
from .postprocess import (
    post_process_instance_segmentation,
    post_process_object_detection,
    post_process_panoptic_segmentation,
    post_process_semantic_segmentation,
)

__all__ = [
    "BatchFeature",
    "DetrImageProcessor",
    "post_process_instance_segmentation",
    "post_process_object_detection",
    "post_process_panoptic_segmentation",
    "post_process_semantic_segmentation",
]
