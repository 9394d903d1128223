"""`mask_loss`: the sigmoid focal and dice losses of the matched masks, from the low-resolution mask logits, the
assignment and the padded target masks, with fixed shapes and no host sync.

The work is the per-slot pixel sums [B, M, 4] (focal, p, t, p t) of detr_fast.reference.mask_pixel_sums; the
losses follow from them (reference.mask_loss_from_sums, [B, M]-sized). Three paths compute the sums:

- the Triton kernels (kernels/mask_loss.py) behind the torch.library ops detr_fast::mask_loss_sums and
  detr_fast::mask_loss_sums_backward: the upsampling happens in registers, nothing of full resolution is written
  or saved; taken by CUDA tensors (and by CPU tensors under the "kernel" backend with TRITON_INTERPRET=1);
- the CPU path, detr_fast::mask_loss_sums_cpu and its backward: PyTorch operations with the gradient written out
  by hand: the forward keeps the two full-resolution derivatives the backward needs (d focal / dx and dp / dx),
  where autograd of the reference keeps about nine buffers, and the backward is a few passes;
- the reference (backend "reference", or CUDA without triton).

The targets take no gradient on the fast paths (they are labels).
"""

import torch
import torch.nn.functional as F

from .. import reference
from ..dispatch import kernel_device, triton_or_cpu_path
from .utils import FLOATS, INTS, check_tensor

OP = "detr_fast.mask_loss"


def _sums_like(pred_masks: torch.Tensor, slot_query: torch.Tensor) -> torch.Tensor:
    """An empty [B, M, 4] in the compute dtype."""
    dtype = torch.promote_types(pred_masks.dtype, torch.float32)
    return pred_masks.new_empty((*slot_query.shape, 4), dtype=dtype)


# ------------------------------------------------------------------------------------------------ the Triton path


@torch.library.custom_op("detr_fast::mask_loss_sums", mutates_args=())
def mask_loss_sums_kernel(
    pred_masks: torch.Tensor, slot_query: torch.Tensor, tgt_masks: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """The Triton forward: [B, M, 4] pixel sums from pred_masks [B, N, h, w], slot_query [B, M], tgt_masks
    [B, M, H, W]."""
    with kernel_device("detr_fast::mask_loss_sums", pred_masks):
        from ..kernels.mask_loss import mask_loss_forward  # imports triton: only on the kernel path

        return mask_loss_forward(pred_masks, slot_query, tgt_masks, alpha, gamma)


@mask_loss_sums_kernel.register_fake
def _(pred_masks, slot_query, tgt_masks, alpha, gamma):
    return _sums_like(pred_masks, slot_query)


@torch.library.custom_op("detr_fast::mask_loss_sums_backward", mutates_args=())
def mask_loss_sums_backward_kernel(
    pred_masks: torch.Tensor,
    slot_query: torch.Tensor,
    tgt_masks: torch.Tensor,
    grad_sums: torch.Tensor,
    alpha: float,
    gamma: float,
) -> torch.Tensor:
    """The Triton backward: the gradient [B, N, h, w] of pred_masks from grad_sums [B, M, 4]."""
    with kernel_device("detr_fast::mask_loss_sums_backward", pred_masks):
        from ..kernels.mask_loss import mask_loss_backward

        return mask_loss_backward(pred_masks, slot_query, tgt_masks, grad_sums, alpha, gamma)


@mask_loss_sums_backward_kernel.register_fake
def _(pred_masks, slot_query, tgt_masks, grad_sums, alpha, gamma):
    return torch.empty_like(pred_masks, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------------- the CPU path


# Binary targets (bool masks, what the data pipeline gives) take a shorter form of the same function: with
# z = x (1 - 2t) = +-x, 1 - p_t = sigmoid(z) =: q and the cross entropy is softplus(z), so the focal loss is
# a_t softplus(z) q^gamma, and sign(z) a_t = (1 - alpha) - t. The forward also computes, while it has the terms at
# hand, the two derivatives the backward needs (d focal / dx and dp / dx), and keeps them instead of the nine
# buffers autograd of the reference keeps: the backward is then a few passes. It frees what it no longer needs as it
# goes and works in place.
SOFTPLUS_THRESHOLD = 40.0  # softplus(z) = z above it: exact in float64 too (log1p(exp(-40)) < 1e-17)


def _scale_by_alpha(values: torch.Tensor, target: torch.Tensor, alpha: float, binary_sign: bool) -> torch.Tensor:
    """values * a_t in place (a_t = alpha t + (1 - alpha)(1 - t), 1 for alpha < 0), times sign(z) = 1 - 2t too
    where binary_sign."""
    if alpha >= 0:
        offset, slope = (1 - alpha, -1.0) if binary_sign else (1 - alpha, 2 * alpha - 1)
    elif binary_sign:
        offset, slope = 1.0, -2.0
    else:
        return values
    return values.mul_(target.mul(slope).add_(offset))


def _power(base: torch.Tensor, gamma: float) -> torch.Tensor:
    """base^gamma (a square for the usual gamma = 2)."""
    return base.square() if gamma == 2 else base.pow(gamma)


def _binary_sums_and_derivatives(logits, target, alpha: float, gamma: float):
    """(focal sum [B, M], d focal / dx, dp / dx) for 0/1 targets, from z = x (1 - 2t): d/dz [softplus(z) q^gamma]
    = q^gamma (q + gamma softplus(z) (1 - q)), dz/dx = 1 - 2t, dp/dx = q (1 - q)."""
    z = logits.addcmul_(logits, target, value=-2)  # in place: the logits are no longer needed
    q = torch.sigmoid(z)
    d_focal = F.softplus(z, threshold=SOFTPLUS_THRESHOLD)
    del z, logits
    q_gamma = _power(q, gamma)
    focal = _scale_by_alpha(d_focal * q_gamma, target, alpha, binary_sign=False)
    focal_sum = focal.sum((2, 3))
    del focal
    d_prob = torch.sub(1, q)
    d_focal.mul_(d_prob).mul_(gamma).add_(q).mul_(q_gamma)
    del q_gamma
    d_prob.mul_(q)
    return focal_sum, _scale_by_alpha(d_focal, target, alpha, binary_sign=True), d_prob


def _general_sums_and_derivatives(logits, target, alpha: float, gamma: float):
    """(focal sum [B, M], d focal / dx, dp / dx) for targets in [0, 1]: d focal / dx = a_t ((p - t) m^gamma
    + ce gamma m^(gamma-1) dm/dx) with m = 1 - p_t, dm/dx = dp (1 - 2t), and torch's pow backward (0 for gamma 0)."""
    prob = torch.sigmoid(logits)
    ce = F.softplus(logits, threshold=SOFTPLUS_THRESHOLD).sub_(logits * target)
    del logits
    m = torch.add(prob, target).sub_(prob * target, alpha=2)  # 1 - p_t = p + t - 2 p t
    m_gamma = _power(m, gamma)
    focal_sum = _scale_by_alpha(ce * m_gamma, target, alpha, binary_sign=False).sum((2, 3))
    d_prob = prob * (1 - prob)
    d_focal = (prob - target).mul_(m_gamma)
    del prob, m_gamma
    if gamma == 0:
        ce.zero_()
    else:
        ce.mul_(m.mul_(2) if gamma == 2 else m.pow_(gamma - 1).mul_(gamma))
    d_focal.add_(ce.mul_(d_prob).mul_(1 - 2 * target))
    return focal_sum, _scale_by_alpha(d_focal, target, alpha, binary_sign=False), d_prob


@torch.library.custom_op("detr_fast::mask_loss_sums_cpu", mutates_args=())
def mask_loss_sums_cpu(
    pred_masks: torch.Tensor, slot_query: torch.Tensor, tgt_masks: torch.Tensor, alpha: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CPU path's forward: the [B, M, 4] pixel sums of reference.mask_pixel_sums, and the derivatives the
    backward needs, d focal / dx and dp / dx ([B, M, H, W] each, x the upsampled logits), without autograd."""
    logits = reference.upsampled_logits(pred_masks, slot_query, tgt_masks.shape[-2:])  # [B, M, H, W]
    target = tgt_masks.to(logits.dtype)
    if logits.numel() == 0:  # no slots or no pixels
        empty = logits.new_zeros(logits.shape)
        return logits.new_zeros((*slot_query.shape, 4)), empty, empty.clone()
    prob = torch.sigmoid(logits)
    prob_sum, prob_target_sum = prob.sum((2, 3)), torch.linalg.vecdot(prob.flatten(2), target.flatten(2))
    del prob
    if tgt_masks.dtype == torch.bool:
        focal_sum, d_focal, d_prob = _binary_sums_and_derivatives(logits, target, alpha, gamma)
    else:
        focal_sum, d_focal, d_prob = _general_sums_and_derivatives(logits, target, alpha, gamma)
    sums = torch.stack([focal_sum, prob_sum, target.sum((2, 3)), prob_target_sum], -1)
    return torch.where((slot_query >= 0)[..., None], sums, 0.0), d_focal, d_prob  # [B, M, 4], [B, M, H, W] x 2


@mask_loss_sums_cpu.register_fake
def _(pred_masks, slot_query, tgt_masks, alpha, gamma):
    dtype = torch.promote_types(pred_masks.dtype, torch.float32)
    full = pred_masks.new_empty((*slot_query.shape, *tgt_masks.shape[-2:]), dtype=dtype)
    return _sums_like(pred_masks, slot_query), full, torch.empty_like(full)


@torch.library.custom_op("detr_fast::mask_loss_sums_cpu_backward", mutates_args=())
def mask_loss_sums_cpu_backward(
    d_focal: torch.Tensor,
    d_prob: torch.Tensor,
    slot_query: torch.Tensor,
    tgt_masks: torch.Tensor,
    grad_sums: torch.Tensor,
    queries: int,
    height: int,
    width: int,
) -> torch.Tensor:
    """The CPU path's backward: the gradient [B, N, h, w] (float32, float64 for float64 logits) of the logits of
    `queries` queries of height x width, from the forward's derivatives and grad_sums [B, M, 4]."""
    batch = slot_query.shape[0]
    if d_focal.numel() == 0:
        return d_focal.new_zeros((batch, queries, height, width))
    grad = grad_sums.to(d_focal.dtype).where((slot_query >= 0)[..., None], 0.0)[..., None, None]  # [B, M, 4, 1, 1]
    if tgt_masks.dtype == torch.bool:
        coefficient = torch.where(tgt_masks, grad[:, :, 1] + grad[:, :, 3], grad[:, :, 1])  # d sums(p, p t) / dp
    else:
        coefficient = tgt_masks.to(d_focal.dtype).mul(grad[:, :, 3]).add_(grad[:, :, 1])
    grad_logits = d_focal.mul(grad[:, :, 0]).addcmul_(d_prob, coefficient)  # [B, M, H, W]; the targets take none
    grad_slots = torch.ops.aten.upsample_bilinear2d_backward(
        grad_logits, tgt_masks.shape[-2:], [batch, slot_query.shape[1], height, width], False
    )  # [B, M, h, w]
    grad_pred = grad_slots.new_zeros((batch, queries + 1, height, width))  # an extra query takes the -1 slots
    index = torch.where(slot_query >= 0, slot_query, queries)[..., None, None].expand_as(grad_slots)
    grad_pred.scatter_add_(1, index, grad_slots)
    return grad_pred[:, :queries].contiguous()


@mask_loss_sums_cpu_backward.register_fake
def _(d_focal, d_prob, slot_query, tgt_masks, grad_sums, queries, height, width):
    return d_focal.new_empty((slot_query.shape[0], queries, height, width))


# -------------------------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    pred_masks, slot_query, tgt_masks, ctx.alpha, ctx.gamma = inputs
    ctx.save_for_backward(pred_masks, slot_query, tgt_masks)


def _backward(ctx, grad_sums):
    pred_masks, slot_query, tgt_masks = ctx.saved_tensors
    grad_pred = mask_loss_sums_backward_kernel(pred_masks, slot_query, tgt_masks, grad_sums, ctx.alpha, ctx.gamma)
    return grad_pred, None, None, None, None


def _setup_context_cpu(ctx, inputs, output):
    pred_masks, slot_query, tgt_masks, _alpha, _gamma = inputs
    _sums, d_focal, d_prob = output
    ctx.save_for_backward(d_focal, d_prob, slot_query, tgt_masks)
    ctx.pred_shape, ctx.pred_dtype = pred_masks.shape, pred_masks.dtype


def _backward_cpu(ctx, grad_sums, _grad_d_focal, _grad_d_prob):
    d_focal, d_prob, slot_query, tgt_masks = ctx.saved_tensors
    _batch, queries, height, width = ctx.pred_shape
    grad_pred = mask_loss_sums_cpu_backward(d_focal, d_prob, slot_query, tgt_masks, grad_sums, queries, height, width)
    return grad_pred.to(ctx.pred_dtype), None, None, None, None


mask_loss_sums_kernel.register_autograd(_backward, setup_context=_setup_context)
mask_loss_sums_cpu.register_autograd(_backward_cpu, setup_context=_setup_context_cpu)


# ------------------------------------------------------------------------------------------------- the public op


def check_mask_loss_args(pred_masks, assignment, tgt_masks) -> None:
    """Validate the arguments of `mask_loss` (metadata only, no host sync)."""
    check_tensor(OP, "pred_masks", pred_masks, ndim=4, dtypes=FLOATS)
    check_tensor(OP, "assignment", assignment, ndim=2, dtypes=INTS, device=pred_masks.device)
    check_tensor(OP, "tgt_masks", tgt_masks, ndim=4, dtypes=(torch.bool, *FLOATS), device=pred_masks.device)
    if tuple(assignment.shape) != tuple(pred_masks.shape[:2]):
        raise ValueError(
            f"{OP}: assignment has shape {tuple(assignment.shape)}, expected [B, N] = {tuple(pred_masks.shape[:2])}"
        )
    if tgt_masks.shape[0] != pred_masks.shape[0]:
        raise ValueError(f"{OP}: tgt_masks has {tgt_masks.shape[0]} images but pred_masks {pred_masks.shape[0]}")
    if pred_masks.shape[-1] == 0 or pred_masks.shape[-2] == 0:
        raise ValueError(f"{OP}: pred_masks has shape {tuple(pred_masks.shape)}; its h and w must be at least 1")


def mask_loss(
    pred_masks: torch.Tensor, assignment: torch.Tensor, tgt_masks: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(focal, dice) sums over the matched (query, target) pairs; see detr_fast.reference.mask_loss.

    Args:
        pred_masks: [B, N, h, w] float logits, differentiable; assignment: [B, N] int (target index or -1);
        tgt_masks: [B, M, H, W] bool or float in [0, 1] (zeros in padding; no gradient on the fast paths).
        alpha, gamma: the focal loss's balance (alpha < 0: none) and focusing parameters.
    Returns:
        (focal, dice): float32 scalars (float64 for float64 logits).
    """
    check_mask_loss_args(pred_masks, assignment, tgt_masks)
    slot_query = reference.slot_queries(assignment, tgt_masks.shape[1])  # [B, M]
    path = triton_or_cpu_path(OP, pred_masks.device)
    if path == "triton":
        sums = mask_loss_sums_kernel(pred_masks, slot_query, tgt_masks, float(alpha), float(gamma))
    elif path == "cpu":
        sums = mask_loss_sums_cpu(pred_masks, slot_query, tgt_masks, float(alpha), float(gamma))[0]
    else:
        sums = reference.mask_pixel_sums(pred_masks, slot_query, tgt_masks, alpha, gamma)
    return reference.mask_loss_from_sums(sums, slot_query, tgt_masks.shape[-2] * tgt_masks.shape[-1])
