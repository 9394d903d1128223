"""Triton kernel of `match_cost`: the DETR matching cost of every (decoder layer, image) in one launch.

One program (grid: layers x images, query blocks) costs BLOCK_N queries of one image of one layer against all M
padded targets of that image. It first reduces each query's logits to a softmax maximum and normalizer (once per
query, in BLOCK_C chunks with an online rescale, so any number of classes fits), then walks the targets in BLOCK_M
chunks: it gathers each target label's logit from the query's row (a cached re-read of the row it just reduced),
and computes the L1 over cxcywh and the GIoU over xyxy with the helpers of kernels/box_loss.py, i.e. the same
operations as detr_fast.reference.
Nothing is differentiated: the matching runs under no_grad.
"""

import torch
import triton
import triton.language as tl

from ..reference.match_cost import FOCAL_EPS as REFERENCE_FOCAL_EPS
from .box_loss import cxcywh_to_xyxy, generalized_iou, load_boxes
from .utils import compute_dtype, scalar_to_compute, to_compute

# 16 x 32 cost tiles and 16 x 64 logit chunks with 4 warps: ~120 registers per thread in fp32 on sm_90, no spills
BLOCK_N = 16
MAX_BLOCK_M = 32
MAX_BLOCK_C = 64
NUM_WARPS = 4
FOCAL_EPS = tl.constexpr(REFERENCE_FOCAL_EPS)  # a jit function reads only constexpr globals


@triton.jit
def power(base, exponent):
    """base ** exponent for base >= 0 and a scalar exponent >= 0, with 0 ** 0 = 1 as torch.pow."""
    zero_base = tl.where(exponent == 0, 1.0, 0.0)
    return tl.where(base == 0, zero_base, tl.exp(exponent * tl.log(base)))


@triton.jit
def _match_cost_kernel(
    logits_ptr,  # [L, B, N, K] (K = num_logits), classes contiguous
    pred_ptr,  # [L, B, N, 4] contiguous
    labels_ptr,  # [B, M] contiguous int32/int64
    tgt_ptr,  # [B, M, 4] contiguous
    mask_ptr,  # [B, M] contiguous bool
    out_ptr,  # [L, B, N, M] contiguous
    num_images,  # B
    num_queries,
    num_targets,
    num_logits,
    stride_logits_layer,
    stride_logits_image,
    stride_logits_query,
    # Python floats reach a compiled kernel as fp32 unless annotated; fp64 costs need the exact weights.
    class_w: tl.float64,
    bbox_w: tl.float64,
    giou_w: tl.float64,
    focal_alpha: tl.float64,
    focal_gamma: tl.float64,
    FOCAL: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # The weights in the compute dtype (fp32 inputs: rounded to fp32, as PyTorch's scalar ops do).
    class_w, bbox_w = scalar_to_compute(class_w, FP64), scalar_to_compute(bbox_w, FP64)
    giou_w = scalar_to_compute(giou_w, FP64)
    focal_alpha, focal_gamma = scalar_to_compute(focal_alpha, FP64), scalar_to_compute(focal_gamma, FP64)
    problem = tl.program_id(0).to(tl.int64)  # flat (layer, image) index
    layer = problem // num_images
    image = problem % num_images
    query_block = tl.program_id(1)
    queries = query_block * BLOCK_N + tl.arange(0, BLOCK_N)
    query_ok = queries < num_queries
    logit_rows = logits_ptr + layer * stride_logits_layer + image * stride_logits_image + queries * stride_logits_query

    if not FOCAL:
        # Online softmax statistics over the classes: row_max and row_sum = sum exp(x - row_max).
        row_max = to_compute(tl.full([BLOCK_N], float("-inf"), tl.float32), FP64)
        row_sum = to_compute(tl.zeros([BLOCK_N], dtype=tl.float32), FP64)
        for class_start in range(0, num_logits, BLOCK_C):
            classes = class_start + tl.arange(0, BLOCK_C)
            class_ok = classes < num_logits
            x = tl.load(logit_rows[:, None] + classes[None, :], mask=query_ok[:, None] & class_ok[None, :], other=0.0)
            x = tl.where(class_ok[None, :], to_compute(x, FP64), float("-inf"))  # [BLOCK_N, BLOCK_C]
            new_max = tl.maximum(row_max, tl.max(x, axis=1))
            # A row that is -inf so far keeps a finite shift, so exp(-inf - shift) = 0 instead of NaN.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
            row_max = new_max
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)

    cx, cy, w, h = load_boxes(pred_ptr, problem * num_queries + queries, query_ok, FP64)  # [BLOCK_N] each
    px0, py0, px1, py1 = cxcywh_to_xyxy(cx, cy, w, h)
    out_rows = out_ptr + (problem * num_queries + queries) * num_targets  # [BLOCK_N]

    for target_start in range(0, num_targets, BLOCK_M):
        targets = target_start + tl.arange(0, BLOCK_M)
        target_ok = targets < num_targets
        slots = image * num_targets + targets
        labels = tl.load(labels_ptr + slots, mask=target_ok, other=0)
        real = tl.load(mask_ptr + slots, mask=target_ok, other=0).to(tl.int1)
        tcx, tcy, tw, th = load_boxes(tgt_ptr, slots, target_ok, FP64)  # [BLOCK_M] each
        tx0, ty0, tx1, ty1 = cxcywh_to_xyxy(tcx, tcy, tw, th)

        # Class term: each target's label gathered from its query's logits (labels out of range cost NaN).
        label_ok = (labels >= 0) & (labels < num_logits) & target_ok
        gather_ok = query_ok[:, None] & label_ok[None, :]
        x = to_compute(tl.load(logit_rows[:, None] + labels[None, :], mask=gather_ok, other=0.0), FP64)
        if FOCAL:
            prob = tl.sigmoid(x)
            neg = (1 - focal_alpha) * power(prob, focal_gamma) * (-tl.log(1 - prob + FOCAL_EPS))
            pos = focal_alpha * power(1 - prob, focal_gamma) * (-tl.log(prob + FOCAL_EPS))
            class_cost = pos - neg
        else:
            class_cost = -(tl.exp(x - row_max[:, None]) / row_sum[:, None])
        class_cost = tl.where(label_ok[None, :], class_cost, float("nan"))  # [BLOCK_N, BLOCK_M]

        bbox_cost = (
            tl.abs(cx[:, None] - tcx[None, :])
            + tl.abs(cy[:, None] - tcy[None, :])
            + tl.abs(w[:, None] - tw[None, :])
            + tl.abs(h[:, None] - th[None, :])
        )
        giou = generalized_iou(
            px0[:, None], py0[:, None], px1[:, None], py1[:, None],
            tx0[None, :], ty0[None, :], tx1[None, :], ty1[None, :],
        )  # fmt: skip
        cost = bbox_w * bbox_cost + class_w * class_cost + giou_w * -giou
        cost = tl.where(real[None, :], cost, float("inf"))
        tl.store(out_rows[:, None] + targets[None, :], cost, mask=query_ok[:, None] & target_ok[None, :])


def match_cost_forward(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    tgt_labels: torch.Tensor,
    tgt_boxes: torch.Tensor,
    tgt_mask: torch.Tensor,
    class_w: float,
    bbox_w: float,
    giou_w: float,
    focal: bool,
    focal_alpha: float,
    focal_gamma: float,
) -> torch.Tensor:
    """Launch the kernel over (layers x images, query blocks).

    Args:
        logits: [..., B, N, K] (K = C+1, or C with focal); pred_boxes: [..., B, N, 4] cxcywh.
        tgt_labels: [B, M] int; tgt_boxes: [B, M, 4] cxcywh; tgt_mask: [B, M] bool.
    Returns:
        [..., B, N, M] in float32 (float64 for float64 logits); padded columns +inf.
    """
    *leading, num_images, num_queries, num_logits = logits.shape
    num_targets = tgt_labels.shape[-1]
    dtype = compute_dtype(logits.dtype)
    layers = logits.shape[:-3].numel()
    logits = logits.reshape(layers, num_images, num_queries, num_logits)  # [L, B, N, K]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    pred = pred_boxes.reshape(layers, num_images, num_queries, 4).contiguous()  # [L, B, N, 4]
    out = torch.empty(layers, num_images, num_queries, num_targets, dtype=dtype, device=logits.device)
    if out.numel() > 0:
        grid = (layers * num_images, triton.cdiv(num_queries, BLOCK_N))
        _match_cost_kernel[grid](
            logits, pred, tgt_labels.contiguous(), tgt_boxes.contiguous(), tgt_mask.contiguous(), out,
            num_images, num_queries, num_targets, num_logits,
            logits.stride(0), logits.stride(1), logits.stride(2),
            class_w, bbox_w, giou_w, focal_alpha, focal_gamma,
            FOCAL=focal, FP64=dtype == torch.float64, BLOCK_N=BLOCK_N,
            BLOCK_M=min(MAX_BLOCK_M, max(triton.next_power_of_2(num_targets), 16)),
            BLOCK_C=min(MAX_BLOCK_C, max(triton.next_power_of_2(num_logits), 16)),
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return out.reshape(*leading, num_images, num_queries, num_targets)
