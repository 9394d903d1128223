"""Triton kernels of `box_loss` (fused L1 + GIoU over weighted box pairs) and the box helpers `match_cost` shares.

Every formula mirrors detr_fast.reference.box_ops / reference.box_loss operation for operation, and the backward
kernel mirrors the autograd of those operations, so that ties take the same subgradients: torch.maximum/minimum
split the gradient half/half on equal operands and pass it whole to a NaN operand, the zero clamp passes it at
exactly 0, |x| has gradient sign(x) (0 at 0 and at NaN), and a zero denominator guarded by `divide_or_zero` gets
none. Math runs in float32 (float64 for float64 inputs); loads convert, stores round to the output's dtype.

Launch layout: the pairs are [R, K] (R = the flattened leading dims, e.g. decoder layers; K = pairs per row).
The forward kernel's programs each sum up to PAIRS_PER_PROGRAM pairs of one row (grid: rows x parts); the backward
kernel is elementwise over all R * K pairs (a 1-D grid, so no grid dimension limits R or K).
"""

import torch
import triton
import triton.language as tl

from .utils import compute_dtype, to_compute

PAIRS_PER_PROGRAM = 8192  # forward: rows longer than this are summed in parts, then the parts are added
FORWARD_BLOCK, FORWARD_WARPS = 1024, 8
BACKWARD_BLOCK, BACKWARD_WARPS = 256, 4  # ~75 registers per thread in fp32 on sm_90, no spills


@triton.jit
def minimum(a, b):
    """torch.minimum: NaN in either operand gives NaN. Compare and select (not tl.minimum(propagate_nan=...)), so
    that every dtype, float64 included, lowers the same way on every backend."""
    return tl.where(a != a, a, tl.where(a < b, a, b))


@triton.jit
def maximum(a, b):
    """torch.maximum: NaN in either operand gives NaN (compare and select, as `minimum`)."""
    return tl.where(a != a, a, tl.where(a > b, a, b))


@triton.jit
def clamp_min_zero(x):
    """reference.box_ops.clamp_min_zero: max(x, 0), NaN stays NaN."""
    return tl.where(x < 0, 0.0, x)


@triton.jit
def divide_or_zero(numerator, denominator):
    """reference.box_ops.divide_or_zero: numerator / denominator, 0 where the denominator is 0."""
    zero = denominator == 0
    return tl.where(zero, 0.0, numerator / tl.where(zero, 1.0, denominator))


@triton.jit
def cxcywh_to_xyxy(cx, cy, w, h):
    """reference.box_ops.center_to_corners on four coordinate tensors."""
    return cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h


@triton.jit
def giou_terms(px0, py0, px1, py1, tx0, ty0, tx1, ty1):
    """The intermediate values of reference.box_ops.generalized_iou for xyxy boxes p and t (broadcast).

    Returns (inter_w_raw, inter_h_raw, inter, union, hull_w_raw, hull_h_raw, hull); the *_raw sides are before the
    zero clamp.
    """
    area_p = (px1 - px0) * (py1 - py0)
    area_t = (tx1 - tx0) * (ty1 - ty0)
    inter_w_raw = minimum(px1, tx1) - maximum(px0, tx0)
    inter_h_raw = minimum(py1, ty1) - maximum(py0, ty0)
    inter = clamp_min_zero(inter_w_raw) * clamp_min_zero(inter_h_raw)
    union = area_p + area_t - inter
    hull_w_raw = maximum(px1, tx1) - minimum(px0, tx0)
    hull_h_raw = maximum(py1, ty1) - minimum(py0, ty0)
    hull = clamp_min_zero(hull_w_raw) * clamp_min_zero(hull_h_raw)
    return inter_w_raw, inter_h_raw, inter, union, hull_w_raw, hull_h_raw, hull


@triton.jit
def generalized_iou(px0, py0, px1, py1, tx0, ty0, tx1, ty1):
    """GIoU of xyxy boxes p and t (broadcast), with reference.box_ops' definition for degenerate pairs."""
    _iw, _ih, inter, union, _hw, _hh, hull = giou_terms(px0, py0, px1, py1, tx0, ty0, tx1, ty1)
    return divide_or_zero(inter, union) - divide_or_zero(hull - union, hull)


@triton.jit
def divide_or_zero_grads(numerator, denominator, grad):
    """Autograd of divide_or_zero: (d numerator, d denominator) for the output gradient `grad`."""
    zero = denominator == 0
    safe = tl.where(zero, 1.0, denominator)
    grad = tl.where(zero, 0.0, grad)
    # torch's div backward: d self = g / other, d other = -g * ((self / other) / other)
    return grad / safe, tl.where(zero, 0.0, -grad * ((numerator / safe) / safe))


@triton.jit
def clamp_min_zero_grad(x, grad):
    """Autograd of clamp_min_zero: the gradient passes unless x < 0."""
    return tl.where(x < 0, 0.0, grad)


@triton.jit
def maximum_grads(a, b, grad):
    """Autograd of torch.maximum(a, b): (d a, d b); a tie splits the gradient half/half."""
    split = tl.where(a == b, grad * 0.5, grad)
    return tl.where(a < b, 0.0, split), tl.where(a > b, 0.0, split)


@triton.jit
def minimum_grads(a, b, grad):
    """Autograd of torch.minimum(a, b): (d a, d b); a tie splits the gradient half/half."""
    split = tl.where(a == b, grad * 0.5, grad)
    return tl.where(a > b, 0.0, split), tl.where(a < b, 0.0, split)


@triton.jit
def sign(x):
    """torch.sign: -1, 0 or 1, and 0 for NaN (the gradient of |x|)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def load_boxes(ptr, pairs, mask, FP64: tl.constexpr):
    """cx, cy, w, h of the cxcywh boxes at `pairs` of a contiguous [..., 4] tensor, in the compute dtype."""
    base = ptr + pairs * 4
    cx = to_compute(tl.load(base, mask=mask, other=0.0), FP64)
    cy = to_compute(tl.load(base + 1, mask=mask, other=0.0), FP64)
    w = to_compute(tl.load(base + 2, mask=mask, other=0.0), FP64)
    h = to_compute(tl.load(base + 3, mask=mask, other=0.0), FP64)
    return cx, cy, w, h


@triton.jit
def _box_loss_forward_kernel(
    pred_ptr,  # [R, K, 4] contiguous
    tgt_ptr,  # [R, K, 4] contiguous
    weight_ptr,  # [R, K] contiguous, float or bool
    l1_ptr,  # [R, P] contiguous, P = number of parts per row
    giou_ptr,  # [R, P]
    num_pairs,
    pairs_per_program,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    num_parts = tl.num_programs(1)
    l1_acc = to_compute(tl.zeros([BLOCK], dtype=tl.float32), FP64)
    giou_acc = to_compute(tl.zeros([BLOCK], dtype=tl.float32), FP64)
    start = part * pairs_per_program
    stop = tl.minimum(start + pairs_per_program, num_pairs)
    for block_start in range(start, stop, BLOCK):
        pairs = row * num_pairs + block_start + tl.arange(0, BLOCK)
        valid = block_start + tl.arange(0, BLOCK) < stop
        cx, cy, w, h = load_boxes(pred_ptr, pairs, valid, FP64)
        tcx, tcy, tw, th = load_boxes(tgt_ptr, pairs, valid, FP64)
        weight = to_compute(tl.load(weight_ptr + pairs, mask=valid, other=0), FP64)
        l1 = tl.abs(cx - tcx) + tl.abs(cy - tcy) + tl.abs(w - tw) + tl.abs(h - th)
        px0, py0, px1, py1 = cxcywh_to_xyxy(cx, cy, w, h)
        tx0, ty0, tx1, ty1 = cxcywh_to_xyxy(tcx, tcy, tw, th)
        giou = generalized_iou(px0, py0, px1, py1, tx0, ty0, tx1, ty1)
        # where, not a multiply by `valid`: lanes past the end must not add NaN
        l1_acc += tl.where(valid, l1 * weight, 0.0)
        giou_acc += tl.where(valid, (1 - giou) * weight, 0.0)
    tl.store(l1_ptr + row * num_parts + part, tl.sum(l1_acc, axis=0))
    tl.store(giou_ptr + row * num_parts + part, tl.sum(giou_acc, axis=0))


@triton.jit
def _box_loss_backward_kernel(
    pred_ptr,  # [R, K, 4] contiguous
    tgt_ptr,  # [R, K, 4] contiguous
    weight_ptr,  # [R, K] contiguous
    grad_l1_ptr,  # [R] contiguous
    grad_giou_ptr,  # [R] contiguous
    grad_pred_ptr,  # [R, K, 4] in pred's dtype
    grad_tgt_ptr,  # [R, K, 4] in tgt's dtype (written when TGT_GRAD)
    grad_weight_ptr,  # [R, K] in weight's dtype (written when WEIGHT_GRAD)
    num_pairs,  # K
    total_pairs,  # R * K
    TGT_GRAD: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pairs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat (row, pair) indices
    valid = pairs < total_pairs
    rows = pairs // num_pairs
    cx, cy, w, h = load_boxes(pred_ptr, pairs, valid, FP64)
    tcx, tcy, tw, th = load_boxes(tgt_ptr, pairs, valid, FP64)
    weight = to_compute(tl.load(weight_ptr + pairs, mask=valid, other=0), FP64)
    grad_l1 = to_compute(tl.load(grad_l1_ptr + rows, mask=valid, other=0.0), FP64)
    grad_giou = to_compute(tl.load(grad_giou_ptr + rows, mask=valid, other=0.0), FP64)

    # Forward recomputation (the same operations as the forward kernel).
    px0, py0, px1, py1 = cxcywh_to_xyxy(cx, cy, w, h)
    tx0, ty0, tx1, ty1 = cxcywh_to_xyxy(tcx, tcy, tw, th)
    inter_w_raw, inter_h_raw, inter, union, hull_w_raw, hull_h_raw, hull = giou_terms(
        px0, py0, px1, py1, tx0, ty0, tx1, ty1
    )

    # GIoU term: sum_k weight_k * (1 - giou_k), so d giou_k = -(grad_giou * weight_k).
    grad_iou = -(grad_giou * weight)
    # giou = divide_or_zero(inter, union) - divide_or_zero(hull - union, hull)
    grad_gap, grad_hull = divide_or_zero_grads(hull - union, hull, -grad_iou)
    grad_hull += grad_gap
    grad_union = -grad_gap
    grad_inter, grad_union_iou = divide_or_zero_grads(inter, union, grad_iou)
    grad_union += grad_union_iou
    # union = area_p + area_t - inter
    grad_inter -= grad_union
    # hull and inter: products of zero-clamped sides
    grad_hull_w = clamp_min_zero_grad(hull_w_raw, grad_hull * clamp_min_zero(hull_h_raw))
    grad_hull_h = clamp_min_zero_grad(hull_h_raw, grad_hull * clamp_min_zero(hull_w_raw))
    grad_inter_w = clamp_min_zero_grad(inter_w_raw, grad_inter * clamp_min_zero(inter_h_raw))
    grad_inter_h = clamp_min_zero_grad(inter_h_raw, grad_inter * clamp_min_zero(inter_w_raw))
    # areas: (x1 - x0) * (y1 - y0)
    grad_pw = grad_union * (py1 - py0)
    grad_ph = grad_union * (px1 - px0)
    grad_tw = grad_union * (ty1 - ty0)
    grad_th = grad_union * (tx1 - tx0)
    # inter sides: min(x1) - max(x0); hull sides: max(x1) - min(x0)
    gpx1_i, gtx1_i = minimum_grads(px1, tx1, grad_inter_w)
    gpx0_i, gtx0_i = maximum_grads(px0, tx0, -grad_inter_w)
    gpy1_i, gty1_i = minimum_grads(py1, ty1, grad_inter_h)
    gpy0_i, gty0_i = maximum_grads(py0, ty0, -grad_inter_h)
    gpx1_h, gtx1_h = maximum_grads(px1, tx1, grad_hull_w)
    gpx0_h, gtx0_h = minimum_grads(px0, tx0, -grad_hull_w)
    gpy1_h, gty1_h = maximum_grads(py1, ty1, grad_hull_h)
    gpy0_h, gty0_h = minimum_grads(py0, ty0, -grad_hull_h)
    grad_px0 = -grad_pw + gpx0_i + gpx0_h
    grad_px1 = grad_pw + gpx1_i + gpx1_h
    grad_py0 = -grad_ph + gpy0_i + gpy0_h
    grad_py1 = grad_ph + gpy1_i + gpy1_h

    # L1 term: sum_k weight_k * |pred_k - tgt_k|_1
    grad_abs = grad_l1 * weight
    grad_dcx = grad_abs * sign(cx - tcx)
    grad_dcy = grad_abs * sign(cy - tcy)
    grad_dw = grad_abs * sign(w - tw)
    grad_dh = grad_abs * sign(h - th)

    # corners (x0, x1) = (cx - w/2, cx + w/2)
    out = grad_pred_ptr + pairs * 4
    out_dtype = grad_pred_ptr.dtype.element_ty
    tl.store(out, (grad_dcx + (grad_px0 + grad_px1)).to(out_dtype), mask=valid)
    tl.store(out + 1, (grad_dcy + (grad_py0 + grad_py1)).to(out_dtype), mask=valid)
    tl.store(out + 2, (grad_dw + (0.5 * grad_px1 - 0.5 * grad_px0)).to(out_dtype), mask=valid)
    tl.store(out + 3, (grad_dh + (0.5 * grad_py1 - 0.5 * grad_py0)).to(out_dtype), mask=valid)
    if TGT_GRAD:
        grad_tx0 = -grad_tw + gtx0_i + gtx0_h
        grad_tx1 = grad_tw + gtx1_i + gtx1_h
        grad_ty0 = -grad_th + gty0_i + gty0_h
        grad_ty1 = grad_th + gty1_i + gty1_h
        out = grad_tgt_ptr + pairs * 4
        out_dtype = grad_tgt_ptr.dtype.element_ty
        tl.store(out, (-grad_dcx + (grad_tx0 + grad_tx1)).to(out_dtype), mask=valid)
        tl.store(out + 1, (-grad_dcy + (grad_ty0 + grad_ty1)).to(out_dtype), mask=valid)
        tl.store(out + 2, (-grad_dw + (0.5 * grad_tx1 - 0.5 * grad_tx0)).to(out_dtype), mask=valid)
        tl.store(out + 3, (-grad_dh + (0.5 * grad_ty1 - 0.5 * grad_ty0)).to(out_dtype), mask=valid)
    if WEIGHT_GRAD:
        l1 = tl.abs(cx - tcx) + tl.abs(cy - tcy) + tl.abs(w - tw) + tl.abs(h - th)
        giou = divide_or_zero(inter, union) - divide_or_zero(hull - union, hull)
        grad_weight = grad_l1 * l1 + grad_giou * (1 - giou)
        tl.store(grad_weight_ptr + pairs, grad_weight.to(grad_weight_ptr.dtype.element_ty), mask=valid)


def as_pairs(pred_boxes: torch.Tensor, tgt_boxes: torch.Tensor, weight: torch.Tensor):
    """Contiguous [R, K, 4], [R, K, 4], [R, K] views (copies only when the inputs are not contiguous)."""
    rows, num_pairs = pred_boxes.shape[:-2].numel(), pred_boxes.shape[-2]
    return (
        pred_boxes.reshape(rows, num_pairs, 4).contiguous(),
        tgt_boxes.reshape(rows, num_pairs, 4).contiguous(),
        weight.reshape(rows, num_pairs).contiguous(),
    )


def box_loss_forward(
    pred_boxes: torch.Tensor, tgt_boxes: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: (l1, giou) sums over the pair dim.

    Args:
        pred_boxes, tgt_boxes: [..., K, 4] cxcywh; weight: [..., K] float or bool.
    Returns:
        (l1, giou): [...] each, in the compute dtype of pred_boxes.
    """
    leading = pred_boxes.shape[:-2]
    dtype = compute_dtype(pred_boxes.dtype)
    pred, tgt, weight = as_pairs(pred_boxes, tgt_boxes, weight)  # [R, K, 4], [R, K, 4], [R, K]
    rows, num_pairs = weight.shape
    parts = max(triton.cdiv(num_pairs, PAIRS_PER_PROGRAM), 1)
    l1 = torch.empty(rows, parts, dtype=dtype, device=pred.device)
    giou = torch.empty(rows, parts, dtype=dtype, device=pred.device)
    if rows > 0:
        _box_loss_forward_kernel[(rows, parts)](
            pred, tgt, weight, l1, giou, num_pairs, PAIRS_PER_PROGRAM,
            FP64=dtype == torch.float64, BLOCK=FORWARD_BLOCK, num_warps=FORWARD_WARPS,
        )  # fmt: skip
    if parts > 1:  # a static decision (shapes only): long rows add their parts in a fixed order
        l1, giou = l1.sum(-1), giou.sum(-1)
    return l1.reshape(leading), giou.reshape(leading)


def box_loss_backward(
    pred_boxes: torch.Tensor,
    tgt_boxes: torch.Tensor,
    weight: torch.Tensor,
    grad_l1: torch.Tensor,
    grad_giou: torch.Tensor,
    tgt_grad: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: gradients of sum(grad_l1 * l1 + grad_giou * giou) w.r.t. the inputs.

    Args:
        pred_boxes, tgt_boxes: [..., K, 4]; weight: [..., K]; grad_l1, grad_giou: [...] (the outputs' gradients).
        tgt_grad, weight_grad: whether to compute the gradients of tgt_boxes and weight.
    Returns:
        (grad_pred [..., K, 4], grad_tgt [..., K, 4] or empty [0], grad_weight [..., K] or empty [0]), each in its
        input's dtype.
    """
    pred, tgt, pair_weight = as_pairs(pred_boxes, tgt_boxes, weight)  # [R, K, 4], [R, K, 4], [R, K]
    rows, num_pairs = pair_weight.shape
    grad_l1 = grad_l1.reshape(rows).contiguous()
    grad_giou = grad_giou.reshape(rows).contiguous()
    grad_pred = torch.empty_like(pred)
    grad_tgt = torch.empty_like(tgt) if tgt_grad else tgt.new_empty(0)
    grad_weight = torch.empty_like(pair_weight) if weight_grad else pair_weight.new_empty(0)
    total_pairs = rows * num_pairs
    if total_pairs > 0:
        _box_loss_backward_kernel[(triton.cdiv(total_pairs, BACKWARD_BLOCK),)](
            pred, tgt, pair_weight, grad_l1, grad_giou, grad_pred, grad_tgt, grad_weight, num_pairs, total_pairs,
            TGT_GRAD=tgt_grad, WEIGHT_GRAD=weight_grad, FP64=compute_dtype(pred.dtype) == torch.float64,
            BLOCK=BACKWARD_BLOCK, num_warps=BACKWARD_WARPS,
        )  # fmt: skip
    grad_pred = grad_pred.reshape(pred_boxes.shape)
    if tgt_grad:
        grad_tgt = grad_tgt.reshape(tgt_boxes.shape)
    if weight_grad:
        grad_weight = grad_weight.reshape(weight.shape)
    return grad_pred, grad_tgt, grad_weight
