"""`box_loss`: L1 and GIoU losses of weighted (matched) box pairs, summed over the pair dimension.

Two paths with one contract: the Triton kernels (kernels/box_loss.py: one forward and one backward kernel) behind
the torch.library ops detr_fast::box_loss and detr_fast::box_loss_backward, and the reference
(detr_fast.reference.box_loss), chosen by detr_fast.dispatch.use_triton. Handles: `box_loss_kernel`,
`box_loss_backward_kernel`.
"""

import torch

from .. import reference
from ..dispatch import kernel_device, use_triton
from .utils import FLOATS, check_shape, check_tensor

OP = "detr_fast.box_loss"


def _outputs_like(pred_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two empty [...] tensors in the compute dtype (float32, or float64 for float64 boxes)."""
    dtype = torch.promote_types(pred_boxes.dtype, torch.float32)
    leading = pred_boxes.shape[:-2]
    return pred_boxes.new_empty(leading, dtype=dtype), pred_boxes.new_empty(leading, dtype=dtype)


@torch.library.custom_op("detr_fast::box_loss", mutates_args=())
def box_loss_kernel(
    pred_boxes: torch.Tensor, tgt_boxes: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton forward: (l1 [...], giou [...]) from pred_boxes, tgt_boxes [..., K, 4] and weight [..., K]."""
    with kernel_device("detr_fast::box_loss", pred_boxes):
        from ..kernels.box_loss import box_loss_forward  # imports triton: only on the kernel path

        return box_loss_forward(pred_boxes, tgt_boxes, weight)


@box_loss_kernel.register_fake
def _(pred_boxes, tgt_boxes, weight):
    return _outputs_like(pred_boxes)


@torch.library.custom_op("detr_fast::box_loss_backward", mutates_args=())
def box_loss_backward_kernel(
    pred_boxes: torch.Tensor,
    tgt_boxes: torch.Tensor,
    weight: torch.Tensor,
    grad_l1: torch.Tensor,
    grad_giou: torch.Tensor,
    tgt_grad: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton backward: (grad_pred [..., K, 4], grad_tgt [..., K, 4] or [0], grad_weight [..., K] or [0])."""
    with kernel_device("detr_fast::box_loss_backward", pred_boxes):
        from ..kernels.box_loss import box_loss_backward

        return box_loss_backward(pred_boxes, tgt_boxes, weight, grad_l1, grad_giou, tgt_grad, weight_grad)


@box_loss_backward_kernel.register_fake
def _(pred_boxes, tgt_boxes, weight, grad_l1, grad_giou, tgt_grad, weight_grad):
    # contiguous whatever the inputs' strides, as the kernel writes them
    return (
        pred_boxes.new_empty(pred_boxes.shape),
        tgt_boxes.new_empty(tgt_boxes.shape if tgt_grad else 0),
        weight.new_empty(weight.shape if weight_grad else 0),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_l1, grad_giou):
    pred_boxes, tgt_boxes, weight = ctx.saved_tensors
    _, tgt_grad, weight_grad = ctx.needs_input_grad
    grad_pred, grad_tgt, grad_weight = box_loss_backward_kernel(
        pred_boxes, tgt_boxes, weight, grad_l1, grad_giou, tgt_grad, weight_grad
    )
    return grad_pred, grad_tgt if tgt_grad else None, grad_weight if weight_grad else None


box_loss_kernel.register_autograd(_backward, setup_context=_setup_context)


def check_box_loss_args(pred_boxes, tgt_boxes, weight) -> None:
    """Validate the arguments of `box_loss` (metadata only, no host sync)."""
    check_tensor(OP, "pred_boxes", pred_boxes, min_ndim=2, dtypes=FLOATS)
    if pred_boxes.shape[-1] != 4:
        raise ValueError(f"{OP}: pred_boxes has shape {tuple(pred_boxes.shape)}; expected [..., K, 4]")
    check_tensor(OP, "tgt_boxes", tgt_boxes, dtypes=FLOATS, device=pred_boxes.device)
    check_shape(OP, "tgt_boxes", tgt_boxes, pred_boxes.shape, "tgt_boxes must have pred_boxes' shape")
    check_tensor(OP, "weight", weight, dtypes=FLOATS + (torch.bool,), device=pred_boxes.device)
    check_shape(OP, "weight", weight, pred_boxes.shape[:-1], "one weight per pair: pred_boxes' shape without the 4")


def box_loss(
    pred_boxes: torch.Tensor, tgt_boxes: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_k w_k |p_k - t_k|_1, sum_k w_k (1 - GIoU(p_k, t_k))) over the last pair dim.

    Differentiable in all three inputs, with the reference's autograd (ties included). Degenerate boxes give
    finite values and gradients, NaN coordinates give NaN sums (see detr_fast.reference.box_loss).

    Args:
        pred_boxes: [..., K, 4] cxcywh; tgt_boxes: [..., K, 4] cxcywh; float16, bfloat16, float32 or float64.
        weight: [..., K], 1 for matched pairs and 0 for the rest (float or bool).
    Returns:
        (l1, giou), each [...] in float32 (float64 for float64 pred_boxes).
    """
    check_box_loss_args(pred_boxes, tgt_boxes, weight)
    if use_triton(OP, pred_boxes.device):
        return box_loss_kernel(pred_boxes, tgt_boxes, weight)
    return reference.box_loss(pred_boxes, tgt_boxes, weight)
