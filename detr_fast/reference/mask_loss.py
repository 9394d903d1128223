"""Reference of `mask_loss`: the sigmoid focal and dice losses of every matched (query, target) pair's mask, the
query's low-resolution logits bilinearly upsampled to the targets' size (DETR's, transformers' loss_masks).

In two steps that the fast paths share: `mask_pixel_sums`, per target slot the pixel sums of the focal loss, the
probabilities, the targets and their product (what the kernels compute), and `mask_loss_from_sums`, which turns
those [B, M, 4] sums into the two losses."""

import torch
import torch.nn.functional as F


def slot_queries(assignment: torch.Tensor, num_slots: int) -> torch.Tensor:
    """For each target slot, the query matched to it: assignment [B, N] (target index or -1) -> [B, M] int64, -1
    where no query is. Fixed shapes, no host sync: unmatched queries scatter into an extra slot that is dropped."""
    batch, queries = assignment.shape
    slots = torch.where(assignment >= 0, assignment, num_slots).long()  # [B, N]
    order = torch.arange(queries, device=assignment.device).expand(batch, queries)
    query = torch.full((batch, num_slots + 1), -1, dtype=torch.int64, device=assignment.device)
    query.scatter_(1, slots, order)
    return query[:, :num_slots]


def upsampled_logits(pred_masks: torch.Tensor, slot_query: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The logits of each slot's query ([B, N, h, w] -> [B, M, h, w], query 0 for -1 slots), bilinearly upsampled
    to `size` (align_corners=False) in the compute dtype: [B, M, H, W]."""
    dtype = torch.promote_types(pred_masks.dtype, torch.float32)
    height, width = pred_masks.shape[-2:]
    index = slot_query.clamp(min=0)[..., None, None].expand(-1, -1, height, width)
    logits = pred_masks.to(dtype).gather(1, index)  # [B, M, h, w]
    if logits.shape[1] == 0 or size[0] * size[1] == 0:  # F.interpolate rejects empty tensors
        return logits[..., :1, :1].expand(-1, -1, *size)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # [B, M, H, W]


def mask_pixel_sums(
    pred_masks: torch.Tensor,
    slot_query: torch.Tensor,
    tgt_masks: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Per target slot, the sums over its H x W pixels of the focal loss, p, t and p t (zeros for -1 slots).

    Args:
        pred_masks: [B, N, h, w] mask logits of every query.
        slot_query: [B, M] int64, the query matched to each target slot or -1 (`slot_queries`).
        tgt_masks: [B, M, H, W] bool or float in [0, 1], the padded targets' masks (zeros in padding).
        alpha, gamma: the sigmoid focal loss's (RetinaNet's) balance and focusing parameters; alpha < 0: no balance.
    Returns:
        [B, M, 4] float32 (float64 for float64 logits); p = sigmoid of the upsampled logits.
    """
    logits = upsampled_logits(pred_masks, slot_query, tgt_masks.shape[-2:])  # [B, M, H, W]
    target = tgt_masks.to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    focal = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        focal = (alpha * target + (1 - alpha) * (1 - target)) * focal
    sums = torch.stack([term.sum((2, 3)) for term in (focal, prob, target, prob * target)], -1)  # [B, M, 4]
    return torch.where((slot_query >= 0)[..., None], sums, 0.0)  # a -1 slot's stand-in query may hold NaN


def mask_loss_from_sums(sums: torch.Tensor, slot_query: torch.Tensor, num_pixels: int) -> tuple[torch.Tensor, ...]:
    """(focal, dice) from the pixel sums [B, M, 4] of `mask_pixel_sums` over `num_pixels` = H x W pixels: the sum
    over matched slots of the mean focal loss and of 1 - (2 sum(p t) + 1) / (sum p + sum t + 1)."""
    matched = (slot_query >= 0).to(sums.dtype)  # [B, M]
    focal = sums[..., 0] / max(num_pixels, 1)
    dice = 1 - (2 * sums[..., 3] + 1) / (sums[..., 1] + sums[..., 2] + 1)
    return (focal * matched).sum(), (dice * matched).sum()


def mask_loss(
    pred_masks: torch.Tensor,
    assignment: torch.Tensor,
    tgt_masks: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the focal losses, sum of the dice losses) over the matched pairs.

    Args:
        pred_masks: [B, N, h, w] mask logits of every query.
        assignment: [B, N] int64, each query's target index or -1 (linear_assignment's output).
        tgt_masks: [B, M, H, W] bool or float in [0, 1], the padded targets' masks (zeros in padded slots/pixels).
        alpha, gamma: the sigmoid focal loss's (RetinaNet's) balance and focusing parameters.
    Returns:
        focal: sum over matched pairs of the mean over the H x W pixels of the sigmoid focal loss; dice: sum over
        matched pairs of 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), p the upsampled probabilities. Each a float32
        scalar (float64 for float64 logits).
    """
    slot_query = slot_queries(assignment, tgt_masks.shape[1])  # [B, M]
    sums = mask_pixel_sums(pred_masks, slot_query, tgt_masks, alpha, gamma)  # [B, M, 4]
    return mask_loss_from_sums(sums, slot_query, tgt_masks.shape[-2] * tgt_masks.shape[-1])
