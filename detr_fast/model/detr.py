"""DETR for object detection: backbone -> input projection -> encoder -> decoder -> class and box heads.

Read top to bottom: DetrModel produces the decoder states (and, on request, every layer's hidden states and
attention weights), DetrForObjectDetection adds the heads, the loss (detr_fast.loss, when labels are given) and
post-processing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.collate import pad_images
from ..data.targets import is_padded, pad_targets
from ..loss import DetrLoss
from ..processing.postprocess import post_process_object_detection
from .backbone import Backbone
from .config import DetrConfig
from .outputs import DetrModelOutput, DetrObjectDetectionOutput
from .position_encoding import build_position_embedding
from .pretrained import DetrPreTrainedModel, GradientCheckpointing
from .transformer import Decoder, Encoder


class DetrModel(GradientCheckpointing, nn.Module):
    """Backbone and transformer (transformers' DetrModel): images -> the decoder's object-query states."""

    def __init__(self, config: DetrConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.position_embedding = build_position_embedding(config.position_embedding_type, config.d_model)
        self.query_position_embeddings = nn.Embedding(config.num_queries, config.d_model)
        self.input_projection = nn.Conv2d(self.backbone.num_channels, config.d_model, kernel_size=1)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def forward(
        self,
        pixel_values: torch.Tensor | list[torch.Tensor],
        pixel_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> DetrModelOutput:
        """Encode the images and decode the object queries.

        Args:
            pixel_values: [B, 3, H, W] normalized images padded to a common size, or a list of [3, H_i, W_i] images
                (padded here, with their pixel mask).
            pixel_mask: [B, H, W], 1 for real pixels and 0 for padding (default: all real).
            output_attentions: return the attention weights of every layer (default config.output_attentions).
                The fused attention never materializes them, so such a call runs the reference attention.
            output_hidden_states: return every layer's hidden states (default config.output_hidden_states).
        Returns:
            DetrModelOutput.
        """
        pixel_values, pixel_mask = batch_images("DetrModel", pixel_values, pixel_mask)
        pixel_mask = check_inputs("DetrModel", pixel_values, pixel_mask)
        last_level = self.backbone(pixel_values, pixel_mask)[-1]  # [B, C_backbone, h, w], [B, h, w]
        return self.transform(last_level, output_attentions, output_hidden_states)[0]

    def transform(
        self,
        last_level: tuple[torch.Tensor, torch.Tensor],
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> tuple[DetrModelOutput, torch.Tensor]:
        """The transformer on the backbone's last level (features [B, C_backbone, h, w], mask [B, h, w] bool):
        DetrModelOutput, and the input projection of the features [B, d, h, w] (the mask head reads it)."""
        attentions = self.config.output_attentions if output_attentions is None else output_attentions
        hidden = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        features, mask = last_level
        projected = self.input_projection(features)  # [B, C, h, w]
        source = projected.flatten(2).transpose(1, 2)  # [B, S, C]
        pos = self.position_embedding(mask, projected.dtype)  # [B, S, C]
        padding = ~mask.flatten(1)  # [B, S], True = padding
        memory, encoder_states, encoder_attentions = self.encoder(source, pos, padding, hidden, attentions)
        query_pos = self.query_position_embeddings.weight[None].expand(features.shape[0], -1, -1)  # [B, N, C]
        last, intermediate, decoder_states, self_attentions, cross_attentions = self.decoder(
            query_pos, memory, pos, padding, hidden, attentions
        )  # [B, N, C], [L, B, N, C] or None, ...
        output = DetrModelOutput(
            last_hidden_state=last,
            decoder_hidden_states=decoder_states,
            decoder_attentions=self_attentions,
            cross_attentions=cross_attentions,
            encoder_last_hidden_state=memory,
            encoder_hidden_states=encoder_states,
            encoder_attentions=encoder_attentions,
            intermediate_hidden_states=intermediate,
        )
        return output, projected


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
        pixel_values: torch.Tensor | list[torch.Tensor],
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor] | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> DetrObjectDetectionOutput:
        """Detect objects.

        Args:
            pixel_values: [B, 3, H, W] normalized images, padded to a common size, or a list of [3, H_i, W_i]
                images (padded here, with their pixel mask).
            pixel_mask: [B, H, W], 1 for real pixels and 0 for padding (default: all real).
            labels: transformers-style list of {"class_labels" [M_i], "boxes" [M_i, 4] normalized cxcywh}, or the
                padded mapping of detr_fast.pad_targets (which keeps the step free of host syncs).
            output_attentions, output_hidden_states: as DetrModel (output_attentions runs the reference attention).
        Returns:
            DetrObjectDetectionOutput.
        """
        pixel_values, pixel_mask = batch_images("DetrForObjectDetection", pixel_values, pixel_mask)
        pixel_mask = check_inputs("DetrForObjectDetection", pixel_values, pixel_mask, labels)
        outputs = self.model(pixel_values, pixel_mask, output_attentions, output_hidden_states)
        logits, boxes = self.heads(outputs)  # [L, B, N, C+1], [L, B, N, 4]
        output = DetrObjectDetectionOutput(**self.output_fields(outputs, logits, boxes))
        if labels is not None:
            targets = self.padded_targets(labels, pixel_values.device)
            output.loss, output.loss_dict, output.match_status = self.criterion(logits, boxes, targets)
        return output

    def padded_targets(self, labels, device: torch.device) -> dict[str, torch.Tensor]:
        """The labels as padded targets: the per-image form checked and padded on the host (padded targets keep
        the step free of host syncs), the padded form as it is."""
        if is_padded(labels):
            return labels
        return pad_targets(labels, device=device, num_classes=self.config.num_labels)

    def heads(self, outputs: DetrModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The class and box heads on every decoder layer the loss reads: logits [L, B, N, C+1] and boxes
        [L, B, N, 4] (L = 1 without auxiliary loss; the last layer from the twice-normed last hidden state)."""
        last = outputs.last_hidden_state[None]  # [1, B, N, C]
        if self.config.auxiliary_loss:
            hidden = torch.cat([outputs.intermediate_hidden_states[:-1], last])  # [L, B, N, C]
        else:
            hidden = last
        return self.class_labels_classifier(hidden), self.bbox_predictor(hidden).sigmoid()

    def output_fields(self, outputs: DetrModelOutput, logits: torch.Tensor, boxes: torch.Tensor) -> dict:
        """The fields of a detection (or segmentation) output, from the model's output and every layer's heads."""
        fields = {
            "logits": logits[-1],
            "pred_boxes": boxes[-1],
            "last_hidden_state": outputs.last_hidden_state,
            "decoder_hidden_states": outputs.decoder_hidden_states,
            "decoder_attentions": outputs.decoder_attentions,
            "cross_attentions": outputs.cross_attentions,
            "encoder_last_hidden_state": outputs.encoder_last_hidden_state,
            "encoder_hidden_states": outputs.encoder_hidden_states,
            "encoder_attentions": outputs.encoder_attentions,
        }
        if self.config.auxiliary_loss:
            fields["auxiliary_outputs"] = [{"logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])]
        return fields

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


def batch_images(
    model: str, pixel_values: torch.Tensor | list[torch.Tensor], pixel_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A list of [3, H_i, W_i] images padded into one batch with its pixel mask, as DETR's NestedTensor; a batch
    tensor passes through."""
    if not isinstance(pixel_values, list | tuple):
        return pixel_values, pixel_mask
    if pixel_mask is not None:
        raise ValueError(f"{model}: a list of images brings its own pixel mask; pass pixel_mask=None")
    if not pixel_values or not all(isinstance(image, torch.Tensor) and image.dim() == 3 for image in pixel_values):
        raise ValueError(f"{model}: a list of images must hold [C, H, W] tensors, at least one")
    batch, mask = pad_images(pixel_values)  # [B, C, H, W], [B, H, W]
    return batch, mask.to(batch.device)


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
