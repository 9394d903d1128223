"""What every DETR model class shares: its config, and weights in and out (transformers' PreTrainedModel surface).

Each classmethod builds the class it is called on (`cls`), so `DetrForObjectDetection.from_pretrained` builds a
detector and a segmentation model's `from_pretrained` builds a segmentation model; the state-dict and config work
is detr_fast.model.weights'.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import nn

from .config import DetrConfig
from .weights import (
    detect_layout,
    from_detr_fast,
    infer_config,
    load_into,
    read_checkpoint,
    to_detr_fast,
    write_pretrained,
)

Model = TypeVar("Model", bound="DetrPreTrainedModel")


class GradientCheckpointing:
    """gradient_checkpointing_enable / _disable, as transformers' models have them: in training, every encoder and
    decoder layer then keeps only its inputs and recomputes its activations in the backward (less memory, about
    one more forward pass of time)."""

    def gradient_checkpointing_enable(self) -> None:
        self._set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_gradient_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())

    def _set_gradient_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled


class DetrPreTrainedModel(GradientCheckpointing, nn.Module):
    """Base of the DETR model classes. Subclasses set `transformers_class`, the name of their counterpart in
    transformers, and build themselves from a DetrConfig."""

    config: DetrConfig
    transformers_class: str

    def __init__(self, config: DetrConfig):
        super().__init__()
        self.config = config

    @classmethod
    def for_weights(cls: type[Model], config: DetrConfig) -> Model:
        """A model of `config` whose weights are about to be loaded: built without fetching ImageNet backbone weights
        (use_pretrained_backbone, set in hub configs and the coco-r50 preset) that the load would overwrite, and that
        an offline machine cannot download; the model keeps `config` as given."""
        model = cls(dataclasses.replace(config, use_pretrained_backbone=False))
        model.config = config
        return model

    @classmethod
    def from_pretrained(cls: type[Model], path: str | os.PathLike, config: DetrConfig | None = None) -> Model:
        """Load a directory or file: our safetensors, a training checkpoint (checkpoint.pt, with its config and
        labels), a transformers checkpoint (v4 or v5 keys, .bin or .safetensors with config.json) or an original
        facebookresearch/detr .pth. The model comes back in eval mode, as transformers' does."""
        state_dict, stored = read_checkpoint(path)
        model = cls.for_weights(config or stored or infer_config(state_dict))
        model.load_weights(state_dict, os.fspath(path))
        return model.eval()

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Load a detr_fast state dict, every key present and fitting (ValueError naming those that do not);
        `source` names where it came from in that error."""
        load_into(self, state_dict, source)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors into `directory`; the config records this model's class in
        `architectures`, as transformers' save_pretrained does."""
        self.config.architectures = [type(self).__name__]
        write_pretrained(directory, self.config, self.state_dict())

    @classmethod
    def from_transformers(cls: type[Model], hf_model: nn.Module) -> Model:
        """Copy a transformers model of this class's kind (v4 or v5) into a new detr_fast model, in the mode (train
        or eval) of `hf_model`."""
        model = cls.for_weights(DetrConfig.from_transformers(hf_model.config))
        model.load_weights(to_detr_fast(hf_model.state_dict()), f"{type(hf_model).__name__} (transformers)")
        return model.to(next(hf_model.parameters()).device).train(hf_model.training)

    def to_transformers(self) -> nn.Module:
        """The transformers counterpart of this model with its weights, in the installed version's layout."""
        import transformers

        hf_model = getattr(transformers, self.transformers_class)(self.config.to_transformers())
        state_dict = from_detr_fast(self.state_dict(), detect_layout(hf_model.state_dict()))
        expected = hf_model.state_dict()
        # transformers may keep BatchNorm step counters that frozen BatchNorm does not have.
        state_dict.update({k: v for k, v in expected.items() if k.endswith("num_batches_tracked")})
        load_into(hf_model, state_dict, "a detr_fast model exported to transformers")
        return hf_model.to(next(self.parameters()).device).eval()
