"""detr_fast: DETR that trains and runs faster without changing its results."""

from .data.targets import pad_targets
from .dispatch import backend, current_backend
from .model import DetrConfig, DetrForObjectDetection, DetrForSegmentation, DetrModel
from .processing import DetrImageProcessor, post_process_object_detection

__version__ = "0.1.0"

__all__ = [
    "DetrConfig",
    "DetrForObjectDetection",
    "DetrForSegmentation",
    "DetrImageProcessor",
    "DetrModel",
    "backend",
    "current_backend",
    "pad_targets",
    "post_process_object_detection",
]
