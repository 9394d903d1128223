"""Pure-PyTorch references of every op: the CPU fallback and the test oracle. Imports nothing from model/loss/train."""

from .attention import attention, attention_with_weights
from .box_loss import box_loss
from .linear_assignment import linear_assignment
from .mask_loss import mask_loss, mask_loss_from_sums, mask_pixel_sums, slot_queries, upsampled_logits
from .match_cost import mask_point_cost, match_cost, token_class_cost
from .qkv_projection import qkv_projection
from .upsample_add import upsample_add, upsample_add_strides

__all__ = [
    "attention",
    "attention_with_weights",
    "box_loss",
    "linear_assignment",
    "mask_loss",
    "mask_loss_from_sums",
    "mask_pixel_sums",
    "mask_point_cost",
    "match_cost",
    "qkv_projection",
    "slot_queries",
    "token_class_cost",
    "upsample_add",
    "upsample_add_strides",
    "upsampled_logits",
]
