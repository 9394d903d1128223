"""DETR for segmentation: the detector, an attention map of each query over the encoder's feature map, and a mask
head that turns both, with the backbone's stride-16/8/4 features, into one mask per query (transformers'
DetrForSegmentation, facebookresearch/detr's DETRsegm).

The mask head computes the same function as transformers' but in the original's order: the 1x1 adapters of the FPN
features run on the B images before anything is repeated per query (transformers repeats every FPN map B x Q times
first, then adapts each copy), and the running map is broadcast-added to its image's adapted features.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..loss import DetrLoss
from .config import DetrConfig
from .detr import DetrForObjectDetection, batch_images, check_inputs
from .outputs import DetrSegmentationOutput
from .pretrained import DetrPreTrainedModel
from .weights import detector_prefix, load_into


class ConvBlock(nn.Module):
    """3x3 convolution -> GroupNorm(min(8, C)) -> activation."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(min(8, out_channels), out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class FPNFusionStage(nn.Module):
    """Upsample the running per-query map to an FPN level, add the level's adapted features, refine."""

    def __init__(self, fpn_channels: int, current_channels: int, output_channels: int):
        super().__init__()
        self.fpn_adapter = nn.Conv2d(fpn_channels, current_channels, kernel_size=1)
        self.refine = ConvBlock(current_channels, output_channels)

    def forward(self, features: torch.Tensor, fpn_features: torch.Tensor) -> torch.Tensor:
        """features [B, Q, C, h, w] (per query), fpn_features [B, C_fpn, H, W] (per image) -> [B, Q, C_out, H, W].
        The adapter runs on the B images, and its output is broadcast over the queries in the add, which the op
        upsample_add fuses with the nearest upsample."""
        batch, queries = features.shape[:2]
        adapted = self.fpn_adapter(fpn_features)  # [B, C, H, W]
        dtype = torch.promote_types(features.dtype, adapted.dtype)  # they differ under autocast (GroupNorm: fp32)
        fused = ops.upsample_add(features.to(dtype), adapted.to(dtype))  # [B, Q, C, H, W], channels last per map
        return self.refine(fused.flatten(0, 1)).unflatten(0, (batch, queries))


class MaskHead(nn.Module):
    """The encoder's projected features concatenated with each query's attention maps; two conv blocks; three FPN
    fusion stages (strides 16, 8, 4, widths d/2 -> d/16); a 3x3 convolution to one channel."""

    def __init__(self, input_channels: int, fpn_channels: list[int], hidden_size: int):
        super().__init__()
        if input_channels % 8:
            raise ValueError(f"MaskHead: input_channels (d_model + heads) must be divisible by 8, got {input_channels}")
        self.conv1 = ConvBlock(input_channels, input_channels)
        self.conv2 = ConvBlock(input_channels, hidden_size // 2)
        widths = [hidden_size // 2, hidden_size // 4, hidden_size // 8, hidden_size // 16]
        self.fpn_stages = nn.ModuleList(
            FPNFusionStage(fpn, widths[i], widths[i + 1]) for i, fpn in enumerate(fpn_channels)
        )
        self.output_conv = nn.Conv2d(hidden_size // 16, 1, kernel_size=3, padding=1)

    def forward(self, features: torch.Tensor, attention: torch.Tensor, fpn: list[torch.Tensor]) -> torch.Tensor:
        """features [B, C, h, w] (stride 32), attention [B, Q, heads, h, w], fpn: [B, C_i, H_i, W_i] at strides 16,
        8, 4 -> mask logits [B, Q, H_4, W_4]."""
        batch, queries = attention.shape[:2]
        repeated = features[:, None].expand(-1, queries, -1, -1, -1)  # [B, Q, C, h, w], a view
        hidden = torch.cat([repeated, attention], dim=2).flatten(0, 1)  # [BQ, C + heads, h, w]
        # channels last: the thin convolutions of the per-query maps run 2-4x faster so on the CPU (oneDNN)
        hidden = hidden.contiguous(memory_format=torch.channels_last)
        hidden = self.conv2(self.conv1(hidden)).unflatten(0, (batch, queries))  # [B, Q, d/2, h, w]
        for stage, level in zip(self.fpn_stages, fpn):
            hidden = stage(hidden, level)
        return self.output_conv(hidden.flatten(0, 1)).view(batch, queries, *hidden.shape[-2:])  # [B, Q, H_4, W_4]


class AttentionMap(nn.Module):
    """Each query's attention over the encoder's feature map, per head, with the softmax taken jointly over heads
    and positions (DETR's MHAttentionMap): q from the query states, k a 1x1 convolution of the feature map."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """queries [B, Q, C], memory [B, C, h, w], padding [B, h, w] bool (True = padding) -> [B, Q, heads, h, w]."""
        batch, num_queries = queries.shape[:2]
        height, width = memory.shape[-2:]
        q = self.q_proj(queries).view(batch, num_queries, self.num_heads, self.head_dim)  # [B, Q, H, D]
        k = F.conv2d(memory, self.k_proj.weight[:, :, None, None], self.k_proj.bias)  # [B, C, h, w]
        k = k.view(batch, self.num_heads, self.head_dim, height, width)  # [B, H, D, h, w]
        scores = torch.einsum("bqnd,bndhw->bqnhw", q * self.head_dim**-0.5, k)  # [B, Q, H, h, w]
        scores = scores.masked_fill(padding[:, None, None], torch.finfo(scores.dtype).min)
        return scores.flatten(2).softmax(-1).view(scores.shape)


class DetrForSegmentation(DetrPreTrainedModel):
    """DETR with masks: the detector (`detr`), the attention map (`bbox_attention`) and the mask head
    (`mask_head`); computes the detection and mask losses when given labels with masks.

    `freeze_detector()` leaves only the mask head trainable: DETR's original recipe trains it on a trained detector.
    """

    transformers_class = "DetrForSegmentation"

    def __init__(self, config: DetrConfig):
        super().__init__(config)
        self.detr = DetrForObjectDetection(config)
        backbone = self.detr.model.backbone
        if len(backbone.channels) < 4:
            raise ValueError(
                f"DetrForSegmentation: the mask head reads the backbone's levels at strides 4, 8, 16 and 32, but "
                f"the backbone returns {len(backbone.channels)} level(s) (backbone_kwargs out_indices)"
            )
        heads = config.encoder_attention_heads
        self.bbox_attention = AttentionMap(config.d_model, heads)
        self.mask_head = MaskHead(config.d_model + heads, list(backbone.channels[-2::-1][:3]), config.d_model)
        self.detr.criterion = DetrLoss.from_config(config, masks=True)
        self._init_head()

    def _init_head(self) -> None:
        """transformers' and DETR's initialization of the head: Kaiming-uniform (a=1) convolutions with zero
        biases in the mask head; Xavier-uniform projections with zero biases in the attention map."""
        for module in self.mask_head.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)
        for linear in (self.bbox_attention.q_proj, self.bbox_attention.k_proj):
            nn.init.xavier_uniform_(linear.weight, gain=self.config.init_xavier_std)
            nn.init.zeros_(linear.bias)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Load a segmentation model's state dict; or a detector's (no `detr.` prefix: a detection checkpoint to
        train masks on), which loads into `detr` and leaves the attention map and the mask head initialized."""
        if detector_prefix(state_dict) == "detr.":
            load_into(self, state_dict, source)
        else:
            load_into(self.detr, state_dict, f"{source} (a detector, into DetrForSegmentation.detr)")

    def freeze_detector(self) -> DetrForSegmentation:
        """Train the attention map and the mask head only (the detector's weights stay as they are)."""
        for parameter in self.detr.parameters():
            parameter.requires_grad_(False)
        return self

    def forward(
        self,
        pixel_values: torch.Tensor | list[torch.Tensor],
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor] | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> DetrSegmentationOutput:
        """Detect and segment objects.

        Args:
            pixel_values, pixel_mask: as DetrForObjectDetection.
            labels: per image {"class_labels" [M_i], "boxes" [M_i, 4], "masks" [M_i, H, W]} (the masks of the
                padded batch's size, as the image processor makes them), or padded targets with "masks" [B, M, H, W].
        Returns:
            DetrSegmentationOutput: the detector's fields and pred_masks [B, Q, H/4, W/4] (logits).
        """
        pixel_values, pixel_mask = batch_images("DetrForSegmentation", pixel_values, pixel_mask)
        pixel_mask = check_inputs("DetrForSegmentation", pixel_values, pixel_mask, labels)
        detr = self.detr
        levels = detr.model.backbone(pixel_values, pixel_mask)  # [(features [B, C_i, H_i, W_i], mask [B, H_i, W_i])]
        outputs, projected = detr.model.transform(
            levels[-1], output_attentions, output_hidden_states
        )  # .., [B, d, h, w]
        logits, boxes = detr.heads(outputs)  # [L, B, Q, C+1], [L, B, Q, 4]
        mask = levels[-1][1]  # [B, h, w], True = real
        memory = outputs.encoder_last_hidden_state.transpose(1, 2).reshape(projected.shape)  # [B, d, h, w]
        attention = self.bbox_attention(outputs.last_hidden_state, memory, ~mask)  # [B, Q, heads, h, w]
        pred_masks = self.mask_head(projected, attention, [levels[2][0], levels[1][0], levels[0][0]])  # [B, Q, H4, W4]
        output = DetrSegmentationOutput(pred_masks=pred_masks, **detr.output_fields(outputs, logits, boxes))
        if labels is not None:
            targets = detr.padded_targets(labels, pixel_values.device)
            output.loss, output.loss_dict, output.match_status = detr.criterion(logits, boxes, targets, pred_masks)
        return output

    def post_process_object_detection(self, outputs, threshold: float = 0.5, target_sizes=None):
        return self.detr.post_process_object_detection(outputs, threshold, target_sizes)
