"""`linear_assignment`: exact minimum-cost matching of every (decoder layer, image) problem in one call.

Two implementations of one contract: the batched solver of the extension detr_fast._C (csrc/: a CPU twin over
threads and a CUDA twin, one launch for the whole batch, no host sync), registered as the torch.library op
`detr_fast::linear_assignment` with its fake implementation (detr_fast.ops.extension), so
torch.compile(fullgraph=True) traces it;
and scipy's solver, one problem at a time on the host (detr_fast.reference), the test oracle and the fallback.
"""

import torch

from .. import reference
from ..dispatch import use_extension
from ..reference.linear_assignment import (
    STATUS_INFEASIBLE,
    STATUS_INVALID_ENTRY,
    STATUS_INVALID_NUM_TARGETS,
    STATUS_OK,
)
from .utils import FLOATS, INTS, check_tensor

OP = "detr_fast.linear_assignment"
_REASONS = {
    STATUS_INVALID_ENTRY: "its cost matrix contains NaN or -inf among the real columns",
    STATUS_INFEASIBLE: "its cost matrix is infeasible: no complete assignment avoids the +inf entries",
    STATUS_INVALID_NUM_TARGETS: "its num_targets is outside [0, M] (M = cost.shape[-1])",
}

__all__ = [
    "linear_assignment",
    "raise_for_status",
    "STATUS_OK",
    "STATUS_INVALID_ENTRY",
    "STATUS_INFEASIBLE",
    "STATUS_INVALID_NUM_TARGETS",
]


def check_linear_assignment_args(cost: torch.Tensor, num_targets: torch.Tensor | None) -> torch.Tensor:
    """Validate the arguments; return num_targets as a [..., B] int64 tensor on cost's device."""
    check_tensor(OP, "cost", cost, min_ndim=3, dtypes=FLOATS)
    *batch, _, m = cost.shape
    if num_targets is None:
        return torch.full(batch, m, dtype=torch.int64, device=cost.device)
    check_tensor(OP, "num_targets", num_targets, min_ndim=1, dtypes=INTS, device=cost.device)
    try:
        return torch.broadcast_to(num_targets, batch).long()
    except RuntimeError:
        raise ValueError(
            f"{OP}: num_targets has shape {tuple(num_targets.shape)}; expected [B] or [..., B] broadcastable to "
            f"cost's batch shape {tuple(batch)} (cost is [..., B, N, M] = {tuple(cost.shape)})"
        ) from None


def raise_for_status(status: torch.Tensor) -> None:
    """Raise a ValueError naming the first problem (layer, image) whose status is not ok. Syncs with the device."""
    bad = torch.nonzero(status != STATUS_OK)
    if bad.numel() == 0:
        return
    where = tuple(bad[0].tolist())
    code = int(status[where])
    names = ("image",) if len(where) == 1 else tuple(f"dim {i}" for i in range(len(where) - 2)) + ("layer", "image")
    place = ", ".join(f"{n} {i}" for n, i in zip(names, where, strict=True))
    raise ValueError(f"{OP}: problem ({place}) cannot be solved: {_REASONS[code]} ({len(bad)} bad problem(s) in all)")


def linear_assignment(
    cost: torch.Tensor, num_targets: torch.Tensor | None = None, strict: bool = True
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """For each row (query), the column (target) of a minimum-cost complete assignment, or -1.

    Exact (the optimum scipy finds, the same indices wherever that optimum is unique; among tied optima any one
    of them), solved in float64 whatever the input dtype, every problem of the batch in one call. Problem
    (..., b) uses the first num_targets[b] columns; when it has more columns than rows every row is matched,
    otherwise every column is. +inf entries are forbidden pairs. A problem whose num_targets lies outside
    [0, M] is not solved: its status is STATUS_INVALID_NUM_TARGETS and its rows are -1.

    Args:
        cost: [..., B, N, M] float16/bfloat16/float32/float64, any strides (leading dims, e.g. decoder layers,
            are solved together).
        num_targets: [B] or [..., B] int, defaults to M for every problem.
        strict: True raises a ValueError naming the first problem (layer, image) with a NaN/-inf entry, no
            feasible assignment or num_targets outside [0, M] (this syncs with the device); False never syncs
            and also returns the per-problem status.
    Returns:
        assignment [..., B, N] int64 (all -1 for a problem whose status is not ok), and with strict=False the
        status [..., B] uint8: STATUS_OK, STATUS_INVALID_ENTRY, STATUS_INFEASIBLE or STATUS_INVALID_NUM_TARGETS.
    """
    num_targets = check_linear_assignment_args(cost, num_targets)  # [..., B]
    if use_extension(OP, cost.device, "linear_assignment"):
        assignment, status = torch.ops.detr_fast.linear_assignment(cost, num_targets)
    else:
        assignment, status = reference.linear_assignment(cost, num_targets)
    if strict:
        raise_for_status(status)
        return assignment
    return assignment, status
