"""Reference of `linear_assignment`: scipy's exact solver, one problem at a time on the host."""

import numpy as np
import scipy.optimize
import torch

STATUS_OK = 0
STATUS_INVALID_ENTRY = 1  # a NaN or -inf cost among the real columns
STATUS_INFEASIBLE = 2  # no complete assignment avoids the +inf (forbidden) pairs
STATUS_INVALID_NUM_TARGETS = 3  # num_targets outside [0, M]: the problem is not solved


def linear_assignment(cost: torch.Tensor, num_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost assignment of every problem in the batch with scipy.optimize.linear_sum_assignment.

    Copies the costs to the host (a sync): this is the test oracle and the fallback, not the fast path.

    Args:
        cost: [..., B, N, M] float; problem (…, b) uses only its first num_targets[b] columns.
        num_targets: [B] or [..., B] int; a problem whose count lies outside [0, M] is not solved.
    Returns:
        assignment: [..., B, N] int64, the matched column of each row or -1 (all -1 when status is not ok).
        status: [..., B] uint8, STATUS_OK / STATUS_INVALID_ENTRY / STATUS_INFEASIBLE / STATUS_INVALID_NUM_TARGETS.
    """
    *batch, n, m = cost.shape
    counts = torch.broadcast_to(num_targets, batch).reshape(-1).tolist()
    costs = cost.detach().to("cpu", torch.float64).reshape(-1, n, m).numpy()
    assignment = np.full((len(counts), n), -1, dtype=np.int64)
    status = np.full(len(counts), STATUS_OK, dtype=np.uint8)
    for p, (c, k) in enumerate(zip(costs, counts)):
        if not 0 <= k <= m:
            status[p] = STATUS_INVALID_NUM_TARGETS
            continue
        block = c[:, :k]
        if np.isnan(block).any() or np.isneginf(block).any():
            status[p] = STATUS_INVALID_ENTRY
            continue
        try:
            rows, cols = scipy.optimize.linear_sum_assignment(block)
        except ValueError:  # scipy: "cost matrix is infeasible"
            status[p] = STATUS_INFEASIBLE
            continue
        assignment[p, rows] = cols
    return (
        torch.from_numpy(assignment).reshape(*batch, n).to(cost.device),
        torch.from_numpy(status).reshape(batch).to(cost.device),
    )
