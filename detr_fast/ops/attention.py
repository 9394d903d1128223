"""`attention`: multi-head attention with a key-padding mask, in the (B, L, H, D) layout of the projections."""

import torch

from .. import reference
from ._checks import FLOATS, check_dim, check_shape, check_tensor

OP = "detr_fast.attention"


def check_attention_args(q, k, v, key_padding_mask, dropout_p, scale) -> None:
    """Validate the arguments of `attention` (metadata only, no host sync)."""
    check_tensor(OP, "q", q, ndim=4, dtypes=FLOATS)
    check_tensor(OP, "k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor(OP, "v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    batch, _, heads, head_dim = q.shape
    check_shape(OP, "k", k, (batch, k.shape[1], heads, head_dim), "k must be [B, S, H, D] with q's B, H, D")
    check_shape(OP, "v", v, k.shape, "v must have k's shape [B, S, H, D]")
    if key_padding_mask is not None:
        check_tensor(OP, "key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,), device=q.device)
        check_shape(OP, "key_padding_mask", key_padding_mask, (batch, k.shape[1]), "[B, S], True = padding")
    check_dim(OP, "q", q, 0, k.shape[0], "q and k share the batch size")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not scale > 0:
        raise ValueError(f"{OP}: scale must be positive or None, got {scale}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the keys that are not padding.

    Args:
        q: [B, L, H, D]; k, v: [B, S, H, D] (any strides: the views the projections produce).
        key_padding_mask: [B, S] bool, True = padding.
        dropout_p: dropout on the attention probabilities (pass 0.0 in eval).
        scale: defaults to D ** -0.5.
    Returns:
        [B, L, H, D]; a query whose keys are all padding returns zeros.
    """
    check_attention_args(q, k, v, key_padding_mask, dropout_p, scale)
    return reference.attention(q, k, v, key_padding_mask, dropout_p, scale)
