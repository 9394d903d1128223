"""The reference solver (scipy) and the op's contract: optimum, -1 for unmatched rows, status and errors."""

import itertools

import numpy as np
import pytest
import scipy.optimize
import torch

from detr_fast import backend
from detr_fast.ops import linear_assignment
from detr_fast.ops.linear_assignment import STATUS_INFEASIBLE, STATUS_INVALID_ENTRY, STATUS_OK


def brute_force_cost(cost: np.ndarray) -> float:
    n, m = cost.shape
    if n >= m:
        return min(sum(cost[r, c] for c, r in enumerate(rows)) for rows in itertools.permutations(range(n), m))
    return min(sum(cost[r, c] for r, c in enumerate(cols)) for cols in itertools.permutations(range(m), n))


@pytest.mark.parametrize("n,m", [(4, 3), (3, 5), (5, 5), (6, 1)])
def test_reference_reaches_the_brute_force_optimum(device, n, m):
    cost = torch.randint(0, 4, (n, m), device=device).double()  # small integers: many ties
    with backend("reference"):
        assignment = linear_assignment(cost[None], torch.tensor([m], device=device))[0].cpu()
    matched = assignment >= 0
    assert matched.sum() == min(n, m)
    assert len(set(assignment[matched].tolist())) == min(n, m)  # a column at most once
    total = cost.cpu()[matched.nonzero().squeeze(1), assignment[matched]].sum().item()
    assert total == pytest.approx(brute_force_cost(cost.cpu().numpy()))


def test_only_the_first_num_targets_columns_exist(device):
    cost = torch.rand(2, 3, 10, 6, device=device)
    counts = torch.tensor([0, 2, 6], device=device)
    with backend("reference"):
        assignment = linear_assignment(cost, counts)
    assert assignment.shape == (2, 3, 10)
    for layer, b in itertools.product(range(2), range(3)):
        k = counts[b].item()
        rows, cols = scipy.optimize.linear_sum_assignment(cost[layer, b, :, :k].cpu().numpy())
        expected = torch.full((10,), -1, dtype=torch.int64)
        expected[rows] = torch.as_tensor(cols)
        assert torch.equal(assignment[layer, b].cpu(), expected)


def test_status_and_strict_errors(device):
    cost = torch.rand(3, 4, 4, device=device)
    cost[1, 0, 0] = float("nan")
    cost[2, :, 0] = float("inf")  # column 0 cannot be matched, and every column must be (M = N)
    with backend("reference"):
        assignment, status = linear_assignment(cost, strict=False)
        assert status.tolist() == [STATUS_OK, STATUS_INVALID_ENTRY, STATUS_INFEASIBLE]
        assert (assignment[1:] == -1).all() and (assignment[0] >= 0).all()
        with pytest.raises(ValueError, match=r"problem \(image 1\).*NaN or -inf"):
            linear_assignment(cost)
        with pytest.raises(ValueError, match=r"problem \(image 0\).*infeasible"):
            linear_assignment(cost[2:])
        neg = torch.rand(2, 2, 3, 3, device=device)
        neg[1, 0, 2, 1] = float("-inf")
        with pytest.raises(ValueError, match=r"problem \(layer 1, image 0\)"):
            linear_assignment(neg)


def test_inf_outside_num_targets_is_ignored(device):
    cost = torch.rand(1, 5, 4, device=device)
    cost[..., 2:] = float("nan")  # padded columns hold anything
    with backend("reference"):
        assignment = linear_assignment(cost, torch.tensor([2], device=device))
    assert sorted(assignment[assignment >= 0].tolist()) == [0, 1]


@pytest.mark.parametrize(
    "cost,num_targets,error,match",
    [
        (torch.rand(3, 4), None, ValueError, "at least 3 dims"),
        (torch.rand(2, 3, 4).long(), None, TypeError, "cost must be"),
        (torch.rand(2, 3, 4), torch.tensor([1, 2, 3]), ValueError, "num_targets has shape"),
        (torch.rand(2, 3, 4), torch.tensor([1.0, 2.0]), TypeError, "num_targets must be"),
    ],
)
def test_bad_arguments_are_named(cost, num_targets, error, match):
    with pytest.raises(error, match=match):
        linear_assignment(cost, num_targets)
