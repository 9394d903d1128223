"""Reference of `attention`: multi-head scaled dot-product attention with a key-padding mask."""

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale over the keys that are not padding) v, per head, with PyTorch's
    scaled_dot_product_attention (whichever backend it picks: the math one in float64).

    Args:
        q: [B, L, H, D]; k, v: [B, S, H, D], in the layout the projections produce.
        key_padding_mask: [B, S] bool, True = padding (never attended).
        dropout_p: dropout on the probabilities (applied whenever > 0; callers pass 0 in eval).
        scale: defaults to D ** -0.5.
    Returns:
        [B, L, H, D]; a query whose keys are all padding gets zeros (and its inputs zero gradients).
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L|S, D] views
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale).transpose(1, 2)
    empty = key_padding_mask.all(-1)  # [B]
    # An image whose keys are all padding attends to all of them (a finite softmax instead of 0/0, so no NaN
    # reaches the backward) and its output is then defined as zeros.
    attend = ~key_padding_mask | empty[:, None]  # [B, S]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :], dropout_p=dropout_p, scale=scale)
    return out.masked_fill(empty[:, None, None, None], 0.0).transpose(1, 2)  # [B, L, H, D]
