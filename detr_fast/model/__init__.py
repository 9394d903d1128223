"""DETR: configuration, backbone, position embeddings, transformer, heads, weight conversion."""

from collections.abc import Mapping
from typing import Any

from .config import DetrConfig
from .detr import DetrForObjectDetection, DetrModel
from .outputs import DetrModelOutput, DetrObjectDetectionOutput, DetrSegmentationOutput
from .pretrained import DetrPreTrainedModel
from .segmentation import DetrForSegmentation
from .weights import detector_prefix

# The model classes a checkpoint can name (config.json's `architectures`, TrainConfig.architecture).
ARCHITECTURES: dict[str, type[DetrPreTrainedModel]] = {
    "DetrForObjectDetection": DetrForObjectDetection,
    "DetrForSegmentation": DetrForSegmentation,
}


def architecture_of(config: DetrConfig | None, state_dict: Mapping[str, Any] | None = None) -> str | None:
    """The model class a stored config names (config.json's `architectures`); else, from the weights, the
    segmentation model when they hold the detector under `detr.` (an original DETR panoptic checkpoint); else None."""
    if config is not None and config.architectures:
        return config.architectures[0]
    if state_dict is not None and detector_prefix(state_dict) == "detr.":
        return "DetrForSegmentation"
    return None


def model_class(architecture: str | None) -> type[DetrPreTrainedModel]:
    """The class named `architecture` (None: the detector). ValueError listing the known names."""
    if architecture is None:
        return DetrForObjectDetection
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; detr_fast has {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[architecture]


__all__ = [
    "ARCHITECTURES",
    "DetrConfig",
    "DetrForObjectDetection",
    "DetrForSegmentation",
    "DetrModel",
    "DetrModelOutput",
    "DetrObjectDetectionOutput",
    "DetrPreTrainedModel",
    "DetrSegmentationOutput",
    "architecture_of",
    "model_class",
]
