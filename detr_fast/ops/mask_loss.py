"""`mask_loss`: the sigmoid focal and dice losses of the matched masks, from the low-resolution mask logits, the
assignment and the padded target masks, with fixed shapes and no host sync.

The work is the per-slot pixel sums [B, M, 4] (focal, p, t, p t) of detr_fast.reference.mask_pixel_sums; the
losses follow from them (reference.mask_loss_from_sums, [B, M]-sized). Three paths compute the sums:

- the Triton kernels (kernels/mask_loss.py) behind the torch.library ops detr_fast::mask_loss_sums and
  detr_fast::mask_loss_sums_backward: the upsampling happens in registers, nothing of full resolution is written
  or saved; taken by CUDA tensors (and by CPU tensors under the "kernel" backend with TRITON_INTERPRET=1);
- the CPU path, detr_fast::mask_loss_sums_recompute and its backward: PyTorch operations with the gradient written
  out by hand, so the forward saves only its inputs (the low-resolution logits and the targets) and the backward
  recomputes the upsampling, where autograd of the reference keeps about nine full-resolution buffers;
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
# a_t softplus(z) q^gamma, and sign(z) a_t = (1 - alpha) - t. Each form frees what it no longer needs as it goes and
# works in place, so that a few full-resolution buffers are alive at once (autograd of the reference keeps about
# nine until the backward).
SOFTPLUS_THRESHOLD = 40.0  # softplus(z) = z above it: exact in float64 too (log1p(exp(-40)) < 1e-17)


def _logits_and_target(pred_masks, slot_query, tgt_masks):
    """x, the upsampled logits [B, M, H, W], and t, the targets, both in the compute dtype."""
    logits = reference.upsampled_logits(pred_masks, slot_query, tgt_masks.shape[-2:])  # [B, M, H, W]
    return logits, tgt_masks.to(logits.dtype)


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


def _general_terms(logits, target):
    """(p, ce, m = 1 - p_t) for targets in [0, 1]."""
    prob = torch.sigmoid(logits)
    ce = F.softplus(logits, threshold=SOFTPLUS_THRESHOLD).sub_(logits * target)
    m = torch.add(prob, target).sub_(prob * target, alpha=2)  # 1 - p_t = p + t - 2 p t
    return prob, ce, m


@torch.library.custom_op("detr_fast::mask_loss_sums_recompute", mutates_args=())
def mask_loss_sums_recompute(
    pred_masks: torch.Tensor, slot_query: torch.Tensor, tgt_masks: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """The CPU path's forward: the [B, M, 4] pixel sums of reference.mask_pixel_sums, without autograd."""
    logits, target = _logits_and_target(pred_masks, slot_query, tgt_masks)
    prob = torch.sigmoid(logits)
    prob_sum, prob_target_sum = prob.sum((2, 3)), torch.linalg.vecdot(prob.flatten(2), target.flatten(2))
    if tgt_masks.dtype == torch.bool:
        del prob
        z = logits.addcmul_(logits, target, value=-2) if logits.numel() else logits  # x (1 - 2t), in place
        q = torch.sigmoid(z)
        focal = F.softplus(z, threshold=SOFTPLUS_THRESHOLD).mul_(_power(q, gamma))
        del z, q
    else:
        prob, ce, m = _general_terms(logits, target)
        del logits, prob
        focal = ce.mul_(_power(m, gamma))
        del m
    focal = _scale_by_alpha(focal, target, alpha, binary_sign=False)
    sums = torch.stack([focal.sum((2, 3)), prob_sum, target.sum((2, 3)), prob_target_sum], -1)
    return torch.where((slot_query >= 0)[..., None], sums, 0.0)  # [B, M, 4]


@mask_loss_sums_recompute.register_fake
def _(pred_masks, slot_query, tgt_masks, alpha, gamma):
    return _sums_like(pred_masks, slot_query)


@torch.library.custom_op("detr_fast::mask_loss_sums_recompute_backward", mutates_args=())
def mask_loss_sums_recompute_backward(
    pred_masks: torch.Tensor,
    slot_query: torch.Tensor,
    tgt_masks: torch.Tensor,
    grad_sums: torch.Tensor,
    alpha: float,
    gamma: float,
) -> torch.Tensor:
    """The CPU path's backward: the gradient [B, N, h, w] of pred_masks, recomputing the upsampled logits."""
    batch, queries, height, width = pred_masks.shape
    if slot_query.shape[1] == 0 or tgt_masks.shape[-2] * tgt_masks.shape[-1] == 0:
        return torch.zeros_like(pred_masks, memory_format=torch.contiguous_format)
    logits, target = _logits_and_target(pred_masks, slot_query, tgt_masks)
    grad = grad_sums.to(logits.dtype).where((slot_query >= 0)[..., None], 0.0)[..., None, None]  # [B, M, 4, 1, 1]
    if tgt_masks.dtype == torch.bool:
        # d/dz [softplus(z) q^gamma] = q^gamma (q + gamma softplus(z) (1 - q)); dz/dx = 1 - 2t; dp/dx = q (1 - q)
        z = logits.addcmul_(logits, target, value=-2)
        q = torch.sigmoid(z)
        d_focal = F.softplus(z, threshold=SOFTPLUS_THRESHOLD)
        del z, logits
        dp = torch.sub(1, q)
        d_focal.mul_(dp).mul_(gamma).add_(q).mul_(_power(q, gamma))
        dp.mul_(q)
        del q
        d_focal = _scale_by_alpha(d_focal, target, alpha, binary_sign=True)
    else:
        # d focal/dx = (p - t) m^gamma + ce gamma m^(gamma-1) dm/dx, dm/dx = dp (1 - 2t); torch's pow backward
        prob, ce, m = _general_terms(logits, target)
        del logits
        dp = prob * (1 - prob)
        d_focal = (prob - target).mul_(_power(m, gamma))
        del prob
        if gamma == 0:
            ce.zero_()
        else:
            ce.mul_(m.mul_(2) if gamma == 2 else m.pow_(gamma - 1).mul_(gamma))
        del m
        d_focal.add_(ce.mul_(dp).mul_(1 - 2 * target))
        del ce
        d_focal = _scale_by_alpha(d_focal, target, alpha, binary_sign=False)
    grad_logits = d_focal.mul_(grad[:, :, 0]).add_(dp.mul_(target * grad[:, :, 3] + grad[:, :, 1]))  # [B, M, H, W]
    del dp, target
    grad_slots = torch.ops.aten.upsample_bilinear2d_backward(
        grad_logits, tgt_masks.shape[-2:], [batch, slot_query.shape[1], height, width], False
    )  # [B, M, h, w]
    grad_pred = grad_slots.new_zeros((batch, queries + 1, height, width))  # an extra query takes the -1 slots
    index = torch.where(slot_query >= 0, slot_query, queries)[..., None, None].expand_as(grad_slots)
    grad_pred.scatter_add_(1, index, grad_slots)
    return grad_pred[:, :queries].to(pred_masks.dtype).contiguous()


@mask_loss_sums_recompute_backward.register_fake
def _(pred_masks, slot_query, tgt_masks, grad_sums, alpha, gamma):
    return torch.empty_like(pred_masks, memory_format=torch.contiguous_format)


# -------------------------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    pred_masks, slot_query, tgt_masks, ctx.alpha, ctx.gamma = inputs
    ctx.save_for_backward(pred_masks, slot_query, tgt_masks)


def _backward_with(backward_op):
    def backward(ctx, grad_sums):
        pred_masks, slot_query, tgt_masks = ctx.saved_tensors
        grad_pred = backward_op(pred_masks, slot_query, tgt_masks, grad_sums, ctx.alpha, ctx.gamma)
        return grad_pred, None, None, None, None

    return backward


mask_loss_sums_kernel.register_autograd(_backward_with(mask_loss_sums_backward_kernel), setup_context=_setup_context)
mask_loss_sums_recompute.register_autograd(
    _backward_with(mask_loss_sums_recompute_backward), setup_context=_setup_context
)


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
        sums = mask_loss_sums_recompute(pred_masks, slot_query, tgt_masks, float(alpha), float(gamma))
    else:
        sums = reference.mask_pixel_sums(pred_masks, slot_query, tgt_masks, alpha, gamma)
    return reference.mask_loss_from_sums(sums, slot_query, tgt_masks.shape[-2] * tgt_masks.shape[-1])
