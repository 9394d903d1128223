"""The models' outputs, with transformers' names and behaviour.

As transformers' ModelOutput: a dataclass whose fields that are not None also make an ordered mapping (keys(),
items(), `out["logits"]`) and a tuple (`out[0]` is the first field that is not None, `out.to_tuple()`); and, so that
torch.export and other pytree users see through them, each class is a registered pytree node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree


class ModelOutput:
    """Base of the output dataclasses: mapping and tuple access over the fields that are set (not None)."""

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, key) for key in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(key, getattr(self, key)) for key in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = None  # read when first flattened: the dataclass decorator runs after this hook

        def flatten(output: ModelOutput) -> tuple[list[Any], list[str]]:
            nonlocal names
            names = names or [f.name for f in dataclasses.fields(output)]
            return [getattr(output, name) for name in names], names

        def unflatten(values: list[Any], context: list[str]) -> ModelOutput:
            return cls(**dict(zip(context, values)))

        pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"{cls.__module__}.{cls.__name__}")


@dataclass
class DetrModelOutput(ModelOutput):
    """What DetrModel returns (transformers' fields).

    last_hidden_state [B, N, C]: the decoder's output after its final layer norm. intermediate_hidden_states
    [L, B, N, C]: the layer-normed output of every decoder layer, with config.auxiliary_loss. encoder_last_hidden_state
    [B, S, C]. With output_hidden_states: decoder_hidden_states and encoder_hidden_states, tuples of L + 1 [B, N, C] /
    [B, S, C] (each layer's input, then the last output). With output_attentions: decoder_attentions [B, H, N, N],
    cross_attentions [B, H, N, S] and encoder_attentions [B, H, S, S], one per layer.
    """

    last_hidden_state: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    intermediate_hidden_states: torch.Tensor | None = None


@dataclass
class DetrObjectDetectionOutput(ModelOutput):
    """What DetrForObjectDetection returns (transformers' fields, and match_status).

    logits [B, N, C+1] and pred_boxes [B, N, 4] (normalized cxcywh) come from the last decoder layer;
    auxiliary_outputs holds {"logits", "pred_boxes"} of every other layer when config.auxiliary_loss; with labels:
    loss (scalar), loss_dict (transformers' keys), and match_status [L, B] (0 = ok, see
    detr_fast.ops.linear_assignment) for logging; the hidden states and attentions of DetrModelOutput.
    """

    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    auxiliary_outputs: list[dict[str, torch.Tensor]] | None = None
    last_hidden_state: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    match_status: torch.Tensor | None = None

    @property
    def aux_outputs(self) -> list[dict[str, torch.Tensor]] | None:
        """The original DETR's name of auxiliary_outputs."""
        return self.auxiliary_outputs


@dataclass
class DetrSegmentationOutput(ModelOutput):
    """What DetrForSegmentation returns (transformers' fields, and match_status): DetrObjectDetectionOutput's, and
    pred_masks [B, N, H/4, W/4], the mask logits of every query at a quarter of the padded input's size."""

    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    pred_masks: torch.Tensor | None = None
    auxiliary_outputs: list[dict[str, torch.Tensor]] | None = None
    last_hidden_state: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    match_status: torch.Tensor | None = None
