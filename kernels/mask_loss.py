"""Triton kernels of `mask_loss`: per matched (target slot, query) pair, the pixel sums of the sigmoid focal loss,
the probabilities, the targets and their product, from the query's low-resolution mask logits bilinearly upsampled
(PyTorch's align_corners=False source index: src = (dst + 0.5) * in / out - 0.5, clamped at 0) to the targets'
padded size inside the kernel. Neither pass writes a full-resolution buffer: the backward recomputes the
upsampled logits from the low-resolution ones and scatters its gradient back onto them with atomic adds (as
PyTorch's own CUDA upsample backward does, so the fp32 sums of the gradient are not bitwise reproducible).

Launch layout: programs over (target slot, part of the H x W pixels); each part covers PIXELS_PER_PROGRAM pixels
in blocks of BLOCK. A slot without a query (slot_query -1) does no work. The forward writes one partial sum per
part, which the launch helper adds (a fixed order: deterministic).

Terms per pixel, x the upsampled logit, t the target, p = sigmoid(x) (detr_fast.reference.mask_loss):
  ce = max(x, 0) - x t + log(1 + exp(-|x|)),   m = 1 - (p t + (1 - p)(1 - t)),
  focal = a_t ce m^gamma with a_t = alpha t + (1 - alpha)(1 - t) (a_t = 1 for alpha < 0),
and their derivatives  d ce/dx = p - t,  dm/dx = -p (1 - p)(2t - 1),  dp/dx = p (1 - p).
"""

import torch
import triton
import triton.language as tl

from .utils import compute_dtype, scalar_to_compute, to_compute

PIXELS_PER_PROGRAM = 8192
BLOCK, WARPS = 1024, 4


@triton.jit
def _source_index(dst, in_size, out_size, FP64: tl.constexpr):
    """PyTorch's bilinear source index (align_corners=False) of output indices `dst`: (lower index, upper index,
    weight of the upper one). The scale is in / out in the compute dtype, as PyTorch computes it."""
    scale = to_compute(in_size, FP64) / to_compute(out_size, FP64)
    src = scale * (to_compute(dst, FP64) + 0.5) - 0.5
    src = tl.where(src < 0, 0.0, src)
    low = src.to(tl.int32)  # src >= 0: truncation is floor
    high = tl.where(low < in_size - 1, low + 1, low)
    return low, high, src - low


@triton.jit
def _upsampled_logits(base, offs, valid, h, w, H, W, FP64: tl.constexpr):
    """The bilinearly upsampled logits at flat output pixels `offs` of one query's contiguous [h, w] map at `base`,
    with the four source offsets and weights (for the backward's scatter)."""
    i = offs // W
    j = offs - i * W
    y0, y1, ly1 = _source_index(i, h, H, FP64)
    x0, x1, lx1 = _source_index(j, w, W, FP64)
    ly0 = 1.0 - ly1
    lx0 = 1.0 - lx1
    o00 = y0 * w + x0
    o01 = y0 * w + x1
    o10 = y1 * w + x0
    o11 = y1 * w + x1
    v00 = to_compute(tl.load(base + o00, mask=valid, other=0.0), FP64)
    v01 = to_compute(tl.load(base + o01, mask=valid, other=0.0), FP64)
    v10 = to_compute(tl.load(base + o10, mask=valid, other=0.0), FP64)
    v11 = to_compute(tl.load(base + o11, mask=valid, other=0.0), FP64)
    x = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
    return x, o00, o01, o10, o11, ly0 * lx0, ly0 * lx1, ly1 * lx0, ly1 * lx1


@triton.jit
def _pixel_terms(x, t, alpha, gamma, HAS_ALPHA: tl.constexpr, SQUARE: tl.constexpr):
    """p, ce, m, a_t and m^gamma of the module docstring."""
    p = 1.0 / (1.0 + tl.exp(-x))
    e = tl.exp(-tl.abs(x))
    softplus = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))  # log1p(e), accurate for small e
    ce = tl.where(x > 0, x, 0.0) - x * t + softplus
    p_t = p * t + (1.0 - p) * (1.0 - t)
    m = 1.0 - p_t
    if SQUARE:
        m_gamma = m * m
    else:
        m_gamma = tl.where(m > 0, tl.exp(gamma * tl.log(tl.where(m > 0, m, 1.0))), tl.where(gamma == 0, 1.0, 0.0))
    if HAS_ALPHA:
        a_t = alpha * t + (1.0 - alpha) * (1.0 - t)
    else:
        a_t = tl.full(x.shape, 1.0, x.dtype)
    return p, ce, m, a_t, m_gamma


@triton.jit
def _mask_loss_forward_kernel(
    pred_ptr, query_ptr, tgt_ptr, out_ptr,
    slots, h, w, H, W,
    queries, alpha_arg: tl.float64, gamma_arg: tl.float64,
    HAS_ALPHA: tl.constexpr, SQUARE: tl.constexpr, FP64: tl.constexpr,
    PIXELS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    slot = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    alpha = scalar_to_compute(alpha_arg, FP64)
    gamma = scalar_to_compute(gamma_arg, FP64)
    query = tl.load(query_ptr + slot)
    zero = tl.zeros((BLOCK,), tl.float64 if FP64 else tl.float32)
    focal_acc, p_acc, t_acc, pt_acc = zero, zero, zero, zero
    if query >= 0:
        image = slot // slots
        base = pred_ptr + (image * queries + query) * h * w
        tgt_base = tgt_ptr + slot * H * W
        for start in range(part * PIXELS, (part + 1) * PIXELS, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < H * W
            x, _o00, _o01, _o10, _o11, _w00, _w01, _w10, _w11 = _upsampled_logits(base, offs, valid, h, w, H, W, FP64)
            t = to_compute(tl.load(tgt_base + offs, mask=valid, other=0), FP64)
            p, ce, _m, a_t, m_gamma = _pixel_terms(x, t, alpha, gamma, HAS_ALPHA, SQUARE)
            focal_acc += tl.where(valid, a_t * ce * m_gamma, 0.0)
            p_acc += tl.where(valid, p, 0.0)
            t_acc += t
            pt_acc += tl.where(valid, p * t, 0.0)
    out = out_ptr + (slot * parts + part) * 4
    tl.store(out, tl.sum(focal_acc, 0))
    tl.store(out + 1, tl.sum(p_acc, 0))
    tl.store(out + 2, tl.sum(t_acc, 0))
    tl.store(out + 3, tl.sum(pt_acc, 0))


@triton.jit
def _mask_loss_backward_kernel(
    pred_ptr, query_ptr, tgt_ptr, grad_ptr, grad_pred_ptr,
    slots, h, w, H, W,
    queries, alpha_arg: tl.float64, gamma_arg: tl.float64,
    HAS_ALPHA: tl.constexpr, SQUARE: tl.constexpr, FP64: tl.constexpr,
    PIXELS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    slot = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    query = tl.load(query_ptr + slot)
    if query >= 0:
        alpha = scalar_to_compute(alpha_arg, FP64)
        gamma = scalar_to_compute(gamma_arg, FP64)
        grad_focal = to_compute(tl.load(grad_ptr + slot * 4), FP64)
        grad_p = to_compute(tl.load(grad_ptr + slot * 4 + 1), FP64)
        grad_pt = to_compute(tl.load(grad_ptr + slot * 4 + 3), FP64)
        image = slot // slots
        base = pred_ptr + (image * queries + query) * h * w
        grad_base = grad_pred_ptr + (image * queries + query) * h * w
        tgt_base = tgt_ptr + slot * H * W
        for start in range(part * PIXELS, (part + 1) * PIXELS, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < H * W
            x, o00, o01, o10, o11, w00, w01, w10, w11 = _upsampled_logits(base, offs, valid, h, w, H, W, FP64)
            t = to_compute(tl.load(tgt_base + offs, mask=valid, other=0), FP64)
            p, ce, m, a_t, m_gamma = _pixel_terms(x, t, alpha, gamma, HAS_ALPHA, SQUARE)
            dp = p * (1.0 - p)
            dm = -dp * (2.0 * t - 1.0)
            if SQUARE:
                d_m_gamma = 2.0 * m
            else:
                # torch's pow backward: gamma * m^(gamma - 1), which is 0 at m = 0 for gamma > 1
                safe = tl.where(m > 0, m, 1.0)
                d_m_gamma = tl.where(
                    m > 0,
                    gamma * tl.exp((gamma - 1.0) * tl.log(safe)),
                    tl.where(gamma > 1, 0.0, tl.where(gamma == 1, 1.0, tl.where(gamma == 0, 0.0, float("inf")))),
                )
            d_focal = a_t * ((p - t) * m_gamma + ce * d_m_gamma * dm)
            grad_x = grad_focal * d_focal + (grad_p + grad_pt * t) * dp  # the targets take no gradient
            grad_x = tl.where(valid, grad_x, 0.0)
            # the four taps of the stencil; at the border two taps may share a location
            tl.atomic_add(grad_base + o00, grad_x * w00, mask=valid)
            tl.atomic_add(grad_base + o01, grad_x * w01, mask=valid)
            tl.atomic_add(grad_base + o10, grad_x * w10, mask=valid)
            tl.atomic_add(grad_base + o11, grad_x * w11, mask=valid)


def _launch_args(pred_masks: torch.Tensor, slot_query: torch.Tensor, tgt_masks: torch.Tensor, alpha, gamma):
    """The common arguments: contiguous inputs, targets as uint8 or float, sizes, the grid and the flags."""
    batch, queries, h, w = pred_masks.shape
    slots, height, width = tgt_masks.shape[1:]
    pred = pred_masks.contiguous()
    tgt = (tgt_masks.view(torch.uint8) if tgt_masks.dtype == torch.bool else tgt_masks).contiguous()
    query = slot_query.to(torch.int64).contiguous()
    parts = max(triton.cdiv(height * width, PIXELS_PER_PROGRAM), 1)
    flags = dict(
        HAS_ALPHA=alpha >= 0, SQUARE=gamma == 2.0, FP64=compute_dtype(pred.dtype) == torch.float64,
        PIXELS=PIXELS_PER_PROGRAM, BLOCK=BLOCK, num_warps=WARPS,
    )  # fmt: skip
    sizes = (slots, h, w, height, width, queries, float(alpha), float(gamma))
    return pred, query, tgt, (batch * slots, parts), sizes, flags


def mask_loss_forward(
    pred_masks: torch.Tensor, slot_query: torch.Tensor, tgt_masks: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """Launch the forward kernel.

    Args:
        pred_masks: [B, N, h, w] logits; slot_query: [B, M] the query matched to each target slot, -1 for none;
        tgt_masks: [B, M, H, W] bool or float.
    Returns:
        [B, M, 4] in the compute dtype: per slot, the pixel sums of focal, p, t and p t (zeros for -1 slots).
    """
    batch, slots = slot_query.shape
    pred, query, tgt, grid, sizes, flags = _launch_args(pred_masks, slot_query, tgt_masks, alpha, gamma)
    partial = torch.empty(grid[0], grid[1], 4, dtype=compute_dtype(pred.dtype), device=pred.device)
    if grid[0] > 0:
        _mask_loss_forward_kernel[grid](pred, query, tgt, partial, *sizes, **flags)
    return partial.sum(1).reshape(batch, slots, 4)  # [B, M, 4]


def mask_loss_backward(
    pred_masks: torch.Tensor,
    slot_query: torch.Tensor,
    tgt_masks: torch.Tensor,
    grad_sums: torch.Tensor,
    alpha: float,
    gamma: float,
) -> torch.Tensor:
    """Launch the backward kernel: the gradient [B, N, h, w] (pred_masks' dtype) of the pixel sums with output
    gradient grad_sums [B, M, 4] (the targets' sum takes none)."""
    pred, query, tgt, grid, sizes, flags = _launch_args(pred_masks, slot_query, tgt_masks, alpha, gamma)
    grad_pred = torch.zeros(pred.shape, dtype=compute_dtype(pred.dtype), device=pred.device)  # atomics add here
    if grid[0] > 0 and pred.numel() > 0:
        grad = grad_sums.to(grad_pred.dtype).contiguous()
        _mask_loss_backward_kernel[grid](pred, query, tgt, grad, grad_pred, *sizes, **flags)
    return grad_pred.to(pred_masks.dtype)
