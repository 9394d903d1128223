"""`qkv_projection`: attention input projections where some output rows read (x + pos) and the rest read x."""

import torch

from .. import reference
from ._checks import FLOATS, check_shape, check_tensor

OP = "detr_fast.qkv_projection"


def qkv_projection(
    x: torch.Tensor, pos: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, pos_rows: int
) -> torch.Tensor:
    """out[..., :pos_rows] = (x + pos) @ weight[:pos_rows].T + bias[:pos_rows]; out[..., pos_rows:] reads x alone.

    Args:
        x: [..., C]; pos: [..., C] or None.
        weight: [R, C] (e.g. [Wq; Wk; Wv] with pos_rows = 2C); bias: [R] or None; pos_rows in [0, R].
    Returns:
        [..., R].
    """
    check_tensor(OP, "x", x, min_ndim=1, dtypes=FLOATS)
    check_tensor(OP, "weight", weight, ndim=2, dtypes=FLOATS, device=x.device)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{OP}: weight has shape {tuple(weight.shape)}; expected [R, {x.shape[-1]}] for x {tuple(x.shape)}")
    if pos is not None:
        check_tensor(OP, "pos", pos, dtypes=FLOATS, device=x.device)
        check_shape(OP, "pos", pos, x.shape, "pos must have x's shape")
    if bias is not None:
        check_tensor(OP, "bias", bias, ndim=1, dtypes=FLOATS, device=x.device)
        check_shape(OP, "bias", bias, (weight.shape[0],), "one bias per output row")
    if not 0 <= pos_rows <= weight.shape[0]:
        raise ValueError(f"{OP}: pos_rows must be in [0, {weight.shape[0]}], got {pos_rows}")
    return reference.qkv_projection(x, pos, weight, bias, pos_rows)
