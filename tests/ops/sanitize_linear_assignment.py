"""Run the CUDA solver on a varied batch under compute-sanitizer and check it against scipy.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool TOOL --error-exitcode 1 \
        python tests/ops/sanitize_linear_assignment.py

with TOOL each of memcheck, racecheck, synccheck and initcheck (bench/gpu_suite.sh runs all four).

Covers every launch configuration of csrc/linear_assignment_cuda.cu: a warp per problem and a block per problem
(128 and 256 threads), the cost staged in shared memory or read in place, the working state in shared or global
memory, several problems per block with a partial last block; odd N and M, M = 0, N = 0, M > N, +inf edges,
NaN and -inf entries, num_targets outside [0, M], float16 input, strided input. Exits non-zero on any mismatch
(the sanitizer's own findings set its exit code).
"""

import os
import sys
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# A CUDA run: without this, tests.helpers would take the CPU test device and set TRITON_INTERPRET=1.
os.environ.setdefault("DETR_FAST_TEST_DEVICE", "cuda")

from detr_fast.ops.linear_assignment import STATUS_INVALID_NUM_TARGETS  # noqa: E402
from tests.helpers import assert_matches_scipy, random_costs, solve  # noqa: E402


def cases(device: torch.device) -> list[tuple[str, torch.Tensor, torch.Tensor, bool]]:
    """(name, cost, num_targets, exact_indices) for each configuration."""
    rng = np.random.default_rng(0)

    def costs(kind: str, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
        return torch.from_numpy(random_costs(rng, kind, shape)).to(device, dtype)

    def counts(values) -> torch.Tensor:
        return torch.tensor(values, device=device)

    with_bad_entries = costs("uniform", (4, 150, 33))
    with_bad_entries[1, 7, 3] = float("nan")
    with_bad_entries[2, 0, 30] = -float("inf")
    with_bad_entries[3, :, 5] = float("inf")  # infeasible: target 5 must be matched
    return [
        ("warp, staged, layers x images", costs("uniform", (2, 5, 37, 23)), counts([0, 23, 11, 1, 22]), True),
        # 402 problems: 4 warps (problems) per block on an H100's 132 SMs, and a last block with 2 of them.
        (
            "warp, 4 problems per block, partial last block",
            costs("uniform", (6, 67, 37, 23)),
            torch.randint(0, 24, (67,), generator=torch.Generator().manual_seed(0)).to(device),
            True,
        ),
        ("warp, ties", costs("small_integers", (6, 31, 29)), counts([29, 28, 0, 7, 29, 15]), False),
        ("warp, M > N, float64", costs("normal", (3, 20, 41), torch.float64), counts([41, 20, 33]), True),
        ("warp, +inf edges", costs("forbidden_pairs", (8, 45, 17)), counts([17] * 8), True),
        ("block 128, staged, NaN/-inf/infeasible", with_bad_entries, counts([33, 33, 31, 33]), True),
        ("block 128, in place", costs("uniform", (2, 900, 100)), counts([100, 7]), True),
        ("block 256, state in global memory", costs("uniform", (2, 10000, 5)), counts([5, 3]), True),
        ("block 256, M > N", costs("uniform", (2, 7, 1100)), counts([1100, 513]), True),
        ("M = 0", costs("uniform", (3, 6, 0)), counts([0, 0, 0]), True),
        ("N = 0", costs("uniform", (3, 0, 4)), counts([4, 0, 2]), True),
        ("float16", costs("uniform", (2, 3, 17, 11), torch.float16), counts([11, 4, 0]), False),
        ("strided", costs("uniform", (4, 19, 26))[..., ::2], counts([13, 2, 9, 12]), True),
    ]


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_linear_assignment: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    failures = 0
    for name, cost, num_targets, exact_indices in cases(device):
        try:
            assert_matches_scipy(cost, num_targets, exact_indices)
        except AssertionError:
            failures += 1
            print(f"MISMATCH {name}:\n{traceback.format_exc()}")
        else:
            print(f"ok {name}: cost {tuple(cost.shape)}")
    out_of_range = torch.rand(2, 3, 9, 11, device=device)
    _, status = solve(out_of_range, torch.tensor([-1, 12, 11], device=device))
    if status[:, :2].ne(STATUS_INVALID_NUM_TARGETS).any() or status[:, 2].ne(0).any():
        failures += 1
        print(f"MISMATCH num_targets outside [0, M]: status {status.tolist()}")
    else:
        print("ok num_targets outside [0, M]")
    torch.cuda.synchronize()
    print(f"{failures} mismatch(es)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
