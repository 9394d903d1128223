"""The public ops. Each dispatches to its fast path (Triton kernel or detr_fast._C) or to its reference in
detr_fast.reference, as detr_fast.dispatch decides."""

from . import extension  # noqa: F401  (the fake implementations of the extension's ops)
from .attention import attention
from .box_loss import box_loss
from .linear_assignment import linear_assignment
from .mask_loss import mask_loss
from .match_cost import mask_point_cost, match_cost, token_class_cost
from .qkv_projection import qkv_projection
from .upsample_add import upsample_add

__all__ = [
    "attention",
    "box_loss",
    "linear_assignment",
    "mask_loss",
    "mask_point_cost",
    "match_cost",
    "qkv_projection",
    "token_class_cost",
    "upsample_add",
]
