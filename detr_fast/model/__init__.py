"""DETR: configuration, backbone, position embeddings, transformer, heads, weight conversion."""

from .config import DetrConfig
from .detr import DetrForObjectDetection, DetrModel
from .outputs import DetrModelOutput, DetrObjectDetectionOutput
from .pretrained import DetrPreTrainedModel

# The model classes a checkpoint can name (config.json's `architectures`, TrainConfig.architecture).
ARCHITECTURES: dict[str, type[DetrPreTrainedModel]] = {"DetrForObjectDetection": DetrForObjectDetection}


def architecture_of(config: DetrConfig | None) -> str | None:
    """The model class a stored config names (config.json's `architectures`), or None."""
    return config.architectures[0] if config is not None and config.architectures else None


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
    "DetrModel",
    "DetrModelOutput",
    "DetrObjectDetectionOutput",
    "DetrPreTrainedModel",
    "architecture_of",
    "model_class",
]
