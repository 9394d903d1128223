"""`match_cost`: the DETR matching cost of every decoder layer on padded targets, [..., B, N, M]; and the two cost
terms of DETR descendants it does not cover, each a sibling with its reference: `token_class_cost` (Grounding
DINO's class cost over text tokens) and `mask_point_cost` (RF-DETR's mask costs on sampled points). Both are
batched matrix products of per-token or per-point terms (the GEMM is the kernel), so their one path is the
reference's PyTorch code, on any device, checked here.

Three paths with one contract: the Triton kernel (kernels/match_cost.py: every layer and image in one launch) behind
the torch.library op detr_fast::match_cost (handle `match_cost_kernel`), taken where detr_fast.dispatch.use_triton
says (CUDA tensors); its fused CPU twin in detr_fast._C (csrc/match_cost_cpu.cpp, op detr_fast::match_cost_cpu: the
box terms, and the class term read from a table of class costs) for CPU tensors when the extension is
built; and the reference (detr_fast.reference.match_cost) otherwise. No gradient: the matching runs under no_grad.
"""

import torch

from .. import reference
from ..dispatch import kernel_device, use_extension, use_triton
from ..reference.match_cost import focal_class_costs
from .utils import FLOATS, INTS, check_shape, check_tensor

OP = "detr_fast.match_cost"


@torch.library.custom_op("detr_fast::match_cost", mutates_args=())
def match_cost_kernel(
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
    """The Triton matching cost: [..., B, N, M] from logits [..., B, N, K] and padded targets [B, M]."""
    with kernel_device("detr_fast::match_cost", logits):
        from ..kernels.match_cost import match_cost_forward  # imports triton: only on the kernel path

        return match_cost_forward(
            logits,
            pred_boxes,
            tgt_labels,
            tgt_boxes,
            tgt_mask,
            class_w,
            bbox_w,
            giou_w,
            focal,
            focal_alpha,
            focal_gamma,
        )


@match_cost_kernel.register_fake
def _(logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask, class_w, bbox_w, giou_w, focal, focal_alpha, focal_gamma):
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.new_empty((*logits.shape[:-1], tgt_labels.shape[-1]), dtype=dtype)


def check_match_cost_args(
    logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask, focal_alpha: float = 0.25, focal_gamma: float = 2.0
) -> None:
    """Validate the arguments of `match_cost` (metadata and Python scalars only, no host sync)."""
    check_tensor(OP, "logits", logits, min_ndim=3, dtypes=FLOATS)
    device = logits.device
    check_tensor(OP, "pred_boxes", pred_boxes, min_ndim=3, dtypes=FLOATS, device=device)
    check_shape(OP, "pred_boxes", pred_boxes, (*logits.shape[:-1], 4), "[..., B, N, 4] matching logits [..., B, N, K]")
    batch = logits.shape[-3]
    check_tensor(OP, "tgt_labels", tgt_labels, ndim=2, dtypes=INTS, device=device)
    if tgt_labels.shape[0] != batch:
        raise ValueError(f"{OP}: tgt_labels has shape {tuple(tgt_labels.shape)}; expected [B={batch}, M]")
    num_targets = tgt_labels.shape[1]
    check_tensor(OP, "tgt_boxes", tgt_boxes, ndim=3, dtypes=FLOATS, device=device)
    check_shape(OP, "tgt_boxes", tgt_boxes, (batch, num_targets, 4), "[B, M, 4] matching tgt_labels [B, M]")
    check_tensor(OP, "tgt_mask", tgt_mask, ndim=2, dtypes=(torch.bool,), device=device)
    check_shape(OP, "tgt_mask", tgt_mask, (batch, num_targets), "[B, M] matching tgt_labels")
    if logits.shape[-1] < 1:
        raise ValueError(f"{OP}: logits has shape {tuple(logits.shape)}; its last dim (classes) must not be empty")
    if not 0.0 <= focal_alpha <= 1.0:
        raise ValueError(f"{OP}: focal_alpha must be in [0, 1], got {focal_alpha}")
    if not focal_gamma >= 0.0:
        raise ValueError(f"{OP}: focal_gamma must be >= 0, got {focal_gamma}")


def match_cost(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    tgt_labels: torch.Tensor,
    tgt_boxes: torch.Tensor,
    tgt_mask: torch.Tensor,
    class_w: float = 1.0,
    bbox_w: float = 5.0,
    giou_w: float = 2.0,
    *,
    focal: bool = False,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """bbox_w * L1 + class_w * class_cost + giou_w * -GIoU per image, never the (B·N)×ΣM matrix.

    class_cost is -softmax(logits)[label] (DETR), or with focal=True the focal cost of Deformable-DETR/DINO on
    sigmoid probabilities (alpha focal_alpha, exponent focal_gamma; logits then have C columns, no no-object class).
    Degenerate boxes give finite costs (GIoU as defined in detr_fast.reference.box_ops); NaN inputs give NaN; a real
    target whose label is outside [0, K) costs NaN.

    Args:
        logits: [..., B, N, K] with K = C+1 (K = C with focal); pred_boxes: [..., B, N, 4] cxcywh (leading dims:
            decoder layers, all costed in one launch on the kernel path).
        tgt_labels: [B, M] int; tgt_boxes: [B, M, 4] cxcywh; tgt_mask: [B, M] bool, True = real target.
    Returns:
        [..., B, N, M] float32 (float64 for float64 logits); padded columns are +inf.
    """
    check_match_cost_args(logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask, focal_alpha, focal_gamma)
    class_w, bbox_w, giou_w = float(class_w), float(bbox_w), float(giou_w)
    if use_triton(OP, logits.device):
        return match_cost_kernel(
            logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask, class_w, bbox_w, giou_w,
            bool(focal), float(focal_alpha), float(focal_gamma),
        )  # fmt: skip
    if logits.device.type == "cpu" and use_extension(OP, logits.device, "match_cost_cpu"):
        dtype = torch.promote_types(logits.dtype, torch.float32)  # the reference's compute dtype
        # The class term with torch's vectorized math, read by the twin at each label (a transcendental per pair in
        # scalar C++ costs more): -softmax of every class, or the focal cost already taken at the labels (the
        # reference's own values; the table's columns are then the targets themselves).
        if focal:
            table = _focal_table(logits, tgt_labels, tgt_mask, float(focal_alpha), float(focal_gamma))
            labels = torch.arange(tgt_labels.shape[1], device=logits.device).expand(tgt_labels.shape)  # [B, M]
        else:
            table, labels = -logits.to(dtype).softmax(-1), tgt_labels.long()  # [..., B, N, K], [B, M]
        return torch.ops.detr_fast.match_cost_cpu(
            table, pred_boxes.to(dtype), labels, tgt_boxes.to(dtype), tgt_mask, class_w, bbox_w, giou_w
        )
    return reference.match_cost(
        logits, pred_boxes, tgt_labels.long(), tgt_boxes, tgt_mask, class_w, bbox_w, giou_w,
        focal, focal_alpha, focal_gamma,
    )  # fmt: skip


def _focal_table(
    logits: torch.Tensor, tgt_labels: torch.Tensor, tgt_mask: torch.Tensor, focal_alpha: float, focal_gamma: float
) -> torch.Tensor:
    """The reference's focal class cost ([..., B, N, M], reference.match_cost.class_cost) at the real targets only,
    the padded slots left unset (match_cost_cpu never reads them: +inf there): on the CPU, where the
    padding's share of the work is real (a batch's images have from one to the batch's most targets) and the target
    list costs no device sync."""
    image, slot = tgt_mask.nonzero().unbind(1)  # [T] each
    label = tgt_labels[image, slot].long()  # [T]
    num_logits = logits.shape[-1]
    at_labels = logits.movedim(-3, 0)[image, ..., label.clamp(0, num_logits - 1)]  # [T, ..., N]
    costs = focal_class_costs(at_labels, focal_alpha, focal_gamma)
    label_bad = ((label < 0) | (label >= num_logits)).view(-1, *[1] * (costs.dim() - 1))  # [T, 1, ...]
    costs.masked_fill_(label_bad, float("nan"))
    table = costs.new_empty((*logits.shape[:-1], tgt_labels.shape[1]))  # [..., B, N, M]
    table.movedim(-3, 0)[image, ..., slot] = costs
    return table


def token_class_cost(
    logits: torch.Tensor, label_maps: torch.Tensor, focal_alpha: float = 0.25, focal_gamma: float = 2.0
) -> torch.Tensor:
    """Grounding DINO's class cost: each text token's focal cost averaged over the tokens of each target's phrase.

    Args:
        logits: [..., B, N, T] text-token logits; label_maps: [B, M, T] (1 on each target's phrase tokens).
    Returns:
        [..., B, N, M] float32 (float64 for float64 logits).
    """
    op = "detr_fast.token_class_cost"
    check_tensor(op, "logits", logits, min_ndim=3, dtypes=FLOATS)
    check_tensor(op, "label_maps", label_maps, ndim=3, device=logits.device)
    batch, tokens = logits.shape[-3], logits.shape[-1]
    if label_maps.shape[0] != batch or label_maps.shape[-1] != tokens:
        raise ValueError(
            f"{op}: label_maps has shape {tuple(label_maps.shape)}; expected [B={batch}, M, T={tokens}] for "
            f"logits of shape {tuple(logits.shape)}"
        )
    if not 0.0 <= focal_alpha <= 1.0 or not focal_gamma >= 0.0:
        raise ValueError(f"{op}: focal_alpha must be in [0, 1] and focal_gamma >= 0, got {focal_alpha}, {focal_gamma}")
    return reference.token_class_cost(logits, label_maps, float(focal_alpha), float(focal_gamma))


def mask_point_cost(pred_points: torch.Tensor, tgt_points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair-wise mask costs of Mask2Former and RF-DETR on P sampled points: (mean sigmoid cross-entropy, dice).

    Args:
        pred_points: [B, N, P] mask logits; tgt_points: [B, M, P] target values in [0, 1].
    Returns:
        (cross-entropy [B, N, M], dice [B, N, M]) float32 (float64 stays).
    """
    op = "detr_fast.mask_point_cost"
    check_tensor(op, "pred_points", pred_points, ndim=3, dtypes=FLOATS)
    check_tensor(op, "tgt_points", tgt_points, ndim=3, device=pred_points.device)
    batch, _, points = pred_points.shape
    if tgt_points.shape[0] != batch or tgt_points.shape[-1] != points:
        raise ValueError(
            f"{op}: tgt_points has shape {tuple(tgt_points.shape)}; expected [B={batch}, M, P={points}] for "
            f"pred_points of shape {tuple(pred_points.shape)}"
        )
    return reference.mask_point_cost(pred_points, tgt_points)
