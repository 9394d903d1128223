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


def attention_with_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention` computed explicitly, for the callers that want the attention weights (output_attentions): the
    same arguments, and also returns the weights [B, H, L, S] after dropout (as transformers' eager attention
    returns them); a query whose keys are all padding gets zero weights and a zero output."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("blhd,bshd->bhls", q, k) * scale  # [B, H, L, S]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        empty = key_padding_mask.all(-1)[:, None, None, None]  # [B, 1, 1, 1]
        scores = scores.masked_fill(empty, 0.0)  # a finite softmax; its weights are zeroed below
    weights = scores.softmax(-1)
    if key_padding_mask is not None:
        weights = weights.masked_fill(empty, 0.0)
    weights = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return torch.einsum("bhls,bshd->blhd", weights, v), weights
