"""DETR: configuration, backbone, position embeddings, transformer, heads, weight conversion."""

from .config import DetrConfig
from .detr import DetrForObjectDetection, DetrModel, DetrObjectDetectionOutput, post_process_object_detection

__all__ = [
    "DetrConfig",
    "DetrForObjectDetection",
    "DetrModel",
    "DetrObjectDetectionOutput",
    "post_process_object_detection",
]
