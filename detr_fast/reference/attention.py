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
    """softmax(q k^T * scale, masked) v per head, materializing the scores (this is the reference, not the kernel).

    Args:
        q: [B, L, H, D]; k, v: [B, S, H, D], in the layout the projections produce.
        key_padding_mask: [B, S] bool, True = padding (never attended).
        dropout_p: dropout on the probabilities (applied whenever > 0; callers pass 0 in eval).
        scale: defaults to D ** -0.5.
    Returns:
        [B, L, H, D]; a query whose keys are all padding gets zeros.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("blhd,bshd->bhls", q, k) * scale  # [B, H, L, S]
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]  # [B, 1, 1, S]
        scores = scores.masked_fill(pad, float("-inf"))
    probs = scores.softmax(-1)
    if key_padding_mask is not None:
        # An all-padding row is NaN after the softmax (0/0); its output is defined as zeros.
        probs = probs.masked_fill(key_padding_mask.all(-1)[:, None, None, None], 0.0)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.einsum("bhls,bshd->blhd", probs, v)
