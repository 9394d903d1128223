"""Reference of `qkv_projection`: the attention input projections with the positional addition."""

import torch
import torch.nn.functional as F


def qkv_projection(
    x: torch.Tensor, pos: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, pos_rows: int
) -> torch.Tensor:
    """Project x with the first `pos_rows` output rows reading (x + pos) and the rest reading x.

    Self-attention: weight = [Wq; Wk; Wv], pos_rows = 2C -> q, k from x + pos and v from x.
    Cross-attention keys/values: weight = [Wk; Wv], pos_rows = C. Queries alone: weight = Wq, pos_rows = C.

    Args:
        x: [..., C]; pos: [..., C] or None (then every row reads x).
        weight: [R, C]; bias: [R] or None; pos_rows: in [0, R].
    Returns:
        [..., R].
    """
    if pos is None or pos_rows == 0:
        return F.linear(x, weight, bias)
    rows = weight.shape[0]
    bias_pos, bias_x = (None, None) if bias is None else (bias[:pos_rows], bias[pos_rows:])
    with_pos = F.linear(x + pos, weight[:pos_rows], bias_pos)
    if pos_rows == rows:
        return with_pos
    return torch.cat([with_pos, F.linear(x, weight[pos_rows:], bias_x)], dim=-1)
