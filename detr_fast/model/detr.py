"""DETR for object detection: backbone -> input projection -> encoder -> decoder -> class and box heads.

Read top to bottom: DetrModel produces the decoder states of every layer, DetrForObjectDetection adds the heads,
the loss (detr_fast.loss, when labels are given) and post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.targets import is_padded, pad_targets
from ..loss import DetrLoss
from ..reference.box_ops import center_to_corners
from .backbone import Backbone
from .config import DetrConfig
from .position_encoding import build_position_embedding
from .pretrained import DetrPreTrainedModel
from .transformer import Decoder, Encoder


class DetrModel(nn.Module):
    """Backbone and transformer; returns the decoder states of every decoder layer."""

    def __init__(self, config: DetrConfig):
        super().__init__()
        self.backbone = Backbone(config)
        self.position_embedding = build_position_embedding(config.position_embedding_type, config.d_model)
        self.query_position_embeddings = nn.Embedding(config.num_queries, config.d_model)
        self.input_projection = nn.Conv2d(self.backbone.num_channels, config.d_model, kernel_size=1)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [B, 3, H, W], pixel_mask [B, H, W] (1 = real pixel) ->
        (decoder states [L, B, N, C], encoder memory [B, S, C])."""
        features, mask = self.backbone(pixel_values, pixel_mask)[-1]  # last level: [B, C_backbone, h, w], [B, h, w]
        source = self.input_projection(features).flatten(2).transpose(1, 2)  # [B, S, C]
        pos = self.position_embedding(mask, pixel_values.dtype)  # [B, S, C]
        padding = ~mask.flatten(1)  # [B, S], True = padding
        memory = self.encoder(source, pos, padding)
        query_pos = self.query_position_embeddings.weight[None].expand(pixel_values.shape[0], -1, -1)  # [B, N, C]
        return self.decoder(query_pos, memory, pos, padding), memory


class MLPHead(nn.Module):
    """A small MLP (the box head): Linear -> ReLU -> ... -> Linear."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., input_dim] -> [..., output_dim]; ReLU between the layers."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


@dataclass
class DetrObjectDetectionOutput:
    """What DetrForObjectDetection returns (transformers' field names).

    logits [B, N, C+1] and pred_boxes [B, N, 4] (normalized cxcywh) come from the last decoder layer;
    auxiliary_outputs holds {"logits", "pred_boxes"} of every other layer when config.auxiliary_loss;
    with labels: loss (scalar), loss_dict (transformers' keys), and match_status [L, B] (0 = ok, see
    detr_fast.ops.linear_assignment) for logging.
    """

    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    auxiliary_outputs: list[dict[str, torch.Tensor]] | None = None
    last_hidden_state: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    match_status: torch.Tensor | None = None

    @property
    def aux_outputs(self) -> list[dict[str, torch.Tensor]] | None:
        return self.auxiliary_outputs

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class DetrForObjectDetection(DetrPreTrainedModel):
    """DETR with class and box heads; computes the loss when given labels. Weights in and out (from_pretrained,
    save_pretrained, from_transformers, to_transformers) come from DetrPreTrainedModel."""

    transformers_class = "DetrForObjectDetection"

    def __init__(self, config: DetrConfig):
        super().__init__(config)
        self.model = DetrModel(config)
        self.class_labels_classifier = nn.Linear(config.d_model, config.num_labels + 1)  # + "no object"
        self.bbox_predictor = MLPHead(config.d_model, config.d_model, 4, num_layers=3)
        self.criterion = DetrLoss.from_config(config)
        self._init_weights()

    def _init_weights(self) -> None:
        """facebookresearch/detr's initialization: Xavier-uniform transformer matrices with zero biases, N(0, 1)
        query embeddings, U(0, 1) learned position embeddings; heads and input projection keep PyTorch defaults;
        the backbone keeps timm's (or its pretrained weights)."""
        for module in (self.model.encoder, self.model.decoder):
            for name, parameter in module.named_parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter, gain=self.config.init_xavier_std)
                elif name.endswith("proj.bias"):
                    nn.init.zeros_(parameter)
        nn.init.normal_(self.model.query_position_embeddings.weight)
        for parameter in self.model.position_embedding.parameters():
            nn.init.uniform_(parameter)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor] | None = None,
    ) -> DetrObjectDetectionOutput:
        """Detect objects.

        Args:
            pixel_values: [B, 3, H, W] normalized images, padded to a common size.
            pixel_mask: [B, H, W], 1 for real pixels and 0 for padding (default: all real).
            labels: transformers-style list of {"class_labels" [M_i], "boxes" [M_i, 4] normalized cxcywh}, or the
                padded mapping of detr_fast.pad_targets (which keeps the step free of host syncs).
        Returns:
            DetrObjectDetectionOutput.
        """
        pixel_mask = check_inputs("DetrForObjectDetection", pixel_values, pixel_mask, labels)
        hidden, memory = self.model(pixel_values, pixel_mask)  # [L, B, N, C], [B, S, C]
        logits = self.class_labels_classifier(hidden)  # [L, B, N, C+1]
        boxes = self.bbox_predictor(hidden).sigmoid()  # [L, B, N, 4]
        output = DetrObjectDetectionOutput(
            logits=logits[-1], pred_boxes=boxes[-1], last_hidden_state=hidden[-1], encoder_last_hidden_state=memory
        )
        if self.config.auxiliary_loss:
            output.auxiliary_outputs = [{"logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])]
        if labels is not None:
            if is_padded(labels):
                targets = labels
            else:  # the per-image form is checked and padded on the host; padded targets keep the step sync-free
                targets = pad_targets(labels, device=pixel_values.device, num_classes=self.config.num_labels)
            output.loss, output.loss_dict, output.match_status = self.criterion(logits, boxes, targets)
        return output

    @torch.no_grad()
    def post_process_object_detection(
        self,
        outputs: DetrObjectDetectionOutput,
        threshold: float = 0.5,
        target_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image, as transformers' DetrImageProcessor.post_process_object_detection.

        Args:
            outputs: this model's output (logits [B, N, C+1], pred_boxes [B, N, 4]).
            threshold: keep detections whose best non-background probability exceeds it.
            target_sizes: [B, 2] (height, width) per image to scale boxes to absolute pixels; None keeps them
                normalized.
        Returns:
            per image {"scores" [K], "labels" [K], "boxes" [K, 4] xyxy}.
        """
        return post_process_object_detection(outputs.logits, outputs.pred_boxes, threshold, target_sizes)


def check_inputs(
    model: str, pixel_values: object, pixel_mask: torch.Tensor | None, labels: object = None
) -> torch.Tensor:
    """Check a forward call's inputs (metadata only, no host sync); return the pixel mask (all ones when None).

    pixel_values must be a floating [B, C, H, W] batch with B >= 1 (normalized images, not uint8 pixels);
    pixel_mask [B, H, W]; labels one target dict per image, or padded targets of B images.
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"{model}: pixel_values must be a [B, C, H, W] tensor, got {shape}")
    batch, _, height, width = pixel_values.shape
    if batch == 0:
        raise ValueError(f"{model}: pixel_values holds no image (shape {tuple(pixel_values.shape)})")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"{model}: pixel_values must be floating point, normalized images (ImageNet mean and std), got "
            f"{pixel_values.dtype}; decoded uint8 pixels go through the data pipeline's ToModelInput first"
        )
    if pixel_mask is None:
        pixel_mask = torch.ones((batch, height, width), dtype=torch.long, device=pixel_values.device)
    elif tuple(pixel_mask.shape) != (batch, height, width):
        raise ValueError(
            f"{model}: pixel_mask has shape {tuple(pixel_mask.shape)}, expected {(batch, height, width)} to match "
            f"pixel_values {tuple(pixel_values.shape)}"
        )
    if labels is not None:
        given = labels["mask"].shape[0] if is_padded(labels) else len(labels)
        if given != batch:
            raise ValueError(f"{model}: labels hold the targets of {given} image(s) but the batch has {batch}")
    return pixel_mask


def post_process_object_detection(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    threshold: float = 0.5,
    target_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """logits [B, N, C+1], pred_boxes [B, N, 4] cxcywh -> per image {"scores", "labels", "boxes" xyxy}."""
    probs = logits.softmax(-1)
    scores, labels = probs[..., :-1].max(-1)  # [B, N]
    boxes = center_to_corners(pred_boxes)  # [B, N, 4]
    if target_sizes is not None:
        if len(target_sizes) != len(logits):
            raise ValueError(f"target_sizes has {len(target_sizes)} entries but the batch has {len(logits)} images")
        sizes = torch.as_tensor(target_sizes, dtype=boxes.dtype, device=boxes.device)  # [B, 2] (h, w)
        height, width = sizes.unbind(1)
        boxes = boxes * torch.stack([width, height, width, height], dim=1)[:, None, :]
    results = []
    for s, l, b in zip(scores, labels, boxes):
        keep = s > threshold
        results.append({"scores": s[keep], "labels": l[keep], "boxes": b[keep]})
    return results
