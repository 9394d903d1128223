"""The extension's solver (CPU twin here, CUDA twin with DETR_FAST_TEST_DEVICE=cuda) against scipy.

Every test forces the extension with backend("kernel"), so a missing extension or a missing CUDA kernel fails
the test instead of silently testing the reference.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import detr_fast._C  # noqa: F401  (defines torch.ops.detr_fast.linear_assignment)
from detr_fast import backend
from detr_fast.ops import linear_assignment
from detr_fast.ops.linear_assignment import (
    STATUS_INFEASIBLE,
    STATUS_INVALID_ENTRY,
    STATUS_INVALID_NUM_TARGETS,
    STATUS_OK,
)

from ..helpers import INF, assert_matches_scipy, random_costs, solve

UNIQUE_OPTIMUM = {"uniform", "normal", "forbidden_pairs"}


def test_property_random_problems_match_scipy(device):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(
        max_examples=1000, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow], database=None
    )
    @hypothesis.given(
        n=st.integers(0, 130),
        m=st.integers(0, 130),
        problems=st.integers(1, 4),
        kind=st.sampled_from(["uniform", "normal", "small_integers", "huge_range", "forbidden_pairs"]),
        all_targets=st.booleans(),
        seed=st.integers(0, 2**32 - 1),
    )
    def check(n, m, problems, kind, all_targets, seed):
        rng = np.random.default_rng(seed)
        cost = torch.from_numpy(random_costs(rng, kind, (problems, n, m))).to(device)
        counts = np.full(problems, m) if all_targets else rng.integers(0, m + 1, problems)
        assert_matches_scipy(cost, torch.from_numpy(counts).to(device), exact_indices=kind in UNIQUE_OPTIMUM)

    check()


@pytest.mark.parametrize("n,m", [(24, 17), (17, 24)])
@pytest.mark.parametrize("kind", ["uniform", "small_integers"])
def test_thousands_of_problems_in_one_call(device, n, m, kind):
    rng = np.random.default_rng(n * 100 + m)
    cost = torch.from_numpy(random_costs(rng, kind, (6, 400, n, m))).to(device)  # 6 layers x 400 images
    counts = torch.from_numpy(rng.integers(0, m + 1, 400)).to(device)  # [B], shared by the layers
    assert_matches_scipy(cost, counts, exact_indices=kind in UNIQUE_OPTIMUM)


@pytest.mark.parametrize(
    "n,m,counts",
    [
        (900, 100, [100, 37, 0, 1]),  # Deformable/DINO query counts
        (100, 900, [900, 250, 100, 99]),  # more targets than queries: every query is matched
        (900, 900, [900, 451, 0, 899]),
    ],
)
def test_large_problems_match_scipy(device, n, m, counts):
    cost = torch.rand(len(counts), n, m, device=device)
    assert_matches_scipy(cost, torch.tensor(counts, device=device), exact_indices=True)


@pytest.mark.parametrize("n,m", [(10000, 5), (5, 10000), (4700, 900)])
def test_problems_too_big_to_stage_match_scipy(device, n, m):
    # On the GPU, beyond the sizes whose cost block (4700 x 900) or whose working state (10000 columns) fits in
    # shared memory: the solver then reads the cost in place / keeps its state in global memory. Few real
    # targets keep the solve cheap.
    counts = [min(m, 5), min(m, 3), 0]
    cost = torch.rand(len(counts), n, m, device=device)
    assert_matches_scipy(cost, torch.tensor(counts, device=device), exact_indices=True)


def test_more_targets_than_queries_matches_every_query(device):
    cost = torch.rand(2, 3, 7, 12, device=device, dtype=torch.float64)
    counts = torch.tensor([12, 9, 7], device=device)
    assignment, status = solve(cost, counts)
    assert (status == STATUS_OK).all()
    assert (assignment >= 0).all()
    assert_matches_scipy(cost, counts, exact_indices=True)


@pytest.mark.parametrize("shape", [(3, 5, 0), (3, 0, 4), (0, 5, 4), (2, 0, 5, 3)])
def test_empty_problems(device, shape):
    cost = torch.rand(shape, device=device)
    assignment, status = solve(cost)
    assert assignment.shape == shape[:-1] and status.shape == shape[:-2]
    assert (assignment == -1).all() and (status == STATUS_OK).all()


def test_zero_targets_leave_every_query_unmatched(device):
    cost = torch.rand(4, 9, 6, device=device)
    assignment, status = solve(cost, torch.tensor([0, 6, 0, 2], device=device))
    assert status.tolist() == [STATUS_OK] * 4
    assert (assignment[[0, 2]] == -1).all()
    assert (assignment[1] >= 0).sum() == 6 and (assignment[3] >= 0).sum() == 2


def test_statuses_and_strict_errors_name_layer_and_image(device):
    cost = torch.rand(2, 4, 5, 5, device=device)  # [layers, images, N, M]
    counts = torch.tensor([5, 5, 3, 5], device=device)
    cost[0, 1, 2, 4] = float("nan")
    cost[1, 0, 0, 0] = -INF
    cost[1, 3, :, 1] = INF  # every target must be matched (M <= N), but no query may take target 1
    cost[0, 2, :, 3:] = float("nan")  # beyond num_targets=3: ignored
    cost[1, 2, 0, 4] = -INF  # ditto
    assignment, status = solve(cost, counts)
    assert status.tolist() == [
        [STATUS_OK, STATUS_INVALID_ENTRY, STATUS_OK, STATUS_OK],
        [STATUS_INVALID_ENTRY, STATUS_OK, STATUS_OK, STATUS_INFEASIBLE],
    ]
    assert (assignment[0, 1] == -1).all() and (assignment[1, 0] == -1).all() and (assignment[1, 3] == -1).all()
    assert_matches_scipy(cost, counts, exact_indices=True)
    with backend("kernel"):
        with pytest.raises(ValueError, match=r"problem \(layer 0, image 1\).*NaN or -inf.*3 bad problem"):
            linear_assignment(cost, counts)
        with pytest.raises(ValueError, match=r"problem \(layer 0, image 0\).*infeasible"):
            linear_assignment(cost[1:, 3:], counts[3:])
        with pytest.raises(ValueError, match=r"problem \(image 0\).*NaN or -inf"):
            linear_assignment(cost[1], counts)
        assert linear_assignment(cost[:, 2], counts[2:3]).shape == (2, 5)  # strict and ok: no error


def test_infeasible_only_when_no_complete_assignment_avoids_inf(device):
    cost = torch.full((2, 4, 3), INF, device=device, dtype=torch.float64)
    # Problem 0: two finite complete assignments hide among the forbidden pairs.
    cost[0, 3, 0] = 5.0
    cost[0, 0, 1] = 7.0
    cost[0, 2, 2] = 1.0
    cost[0, 1, 0] = 100.0  # query 1 can take column 0 only, at a price
    # Problem 1: columns 0 and 1 can only take query 2.
    cost[1, 2, :2] = 1.0
    cost[1, :, 2] = 1.0
    assignment, status = solve(cost)
    assert status.tolist() == [STATUS_OK, STATUS_INFEASIBLE]
    assert assignment[0].tolist() == [1, -1, 2, 0]  # the cheaper of the two finite complete assignments
    assert (assignment[1] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_float_dtype_is_solved_in_float64(device, dtype):
    # k / 256 is exact in every dtype: the solver sees the same float64 values whatever the input dtype, so it
    # takes the same path (ties included) and returns the same indices.
    cost64 = torch.randint(0, 256, (3, 2, 31, 23), device=device, dtype=torch.float64) / 256
    counts = torch.tensor([23, 11], device=device)
    assignment, status = solve(cost64.to(dtype), counts)
    expected_assignment, expected_status = solve(cost64, counts)
    assert torch.equal(assignment, expected_assignment) and torch.equal(status, expected_status)
    assert_matches_scipy(cost64.to(dtype), counts, exact_indices=False)
    if dtype in (torch.float32, torch.float64):  # continuous values: the optimum is unique
        assert_matches_scipy(torch.rand(3, 2, 31, 23, device=device, dtype=dtype), counts, exact_indices=True)


def test_num_targets_outside_zero_to_m_is_a_status_or_a_strict_error(device):
    cost = torch.rand(2, 3, 6, 5, device=device)
    counts = torch.tensor([-1, 3, 6], device=device)  # M = 5
    expected_status = [STATUS_INVALID_NUM_TARGETS, STATUS_OK, STATUS_INVALID_NUM_TARGETS]
    for name in ("kernel", "reference"):  # the same defined result on both paths
        with backend(name):
            assignment, status = linear_assignment(cost, counts, strict=False)
            assert status.tolist() == [expected_status] * 2, name
            assert (assignment[:, [0, 2]] == -1).all(), name
            assert ((assignment[:, 1] >= 0).sum(-1) == 3).all(), name
            with pytest.raises(ValueError, match=r"problem \(layer 0, image 0\).*num_targets is outside \[0, M\]"):
                linear_assignment(cost, counts)


def test_int32_and_broadcast_num_targets(device):
    cost = torch.rand(2, 3, 8, 6, device=device)
    counts32 = torch.tensor([6, 2, 4], device=device, dtype=torch.int32)
    assignment, status = solve(cost, counts32)
    expected_assignment, expected_status = solve(cost, counts32.long().expand(2, 3))
    assert torch.equal(assignment, expected_assignment) and torch.equal(status, expected_status)
    assert_matches_scipy(cost, counts32.long(), exact_indices=True)


def test_non_contiguous_costs_give_the_contiguous_result(device):
    base = torch.rand(3, 4, 20, 26, device=device)
    counts = torch.tensor([13, 0, 7, 10], device=device)
    views = {
        "transposed": base.transpose(-1, -2).contiguous().transpose(-1, -2),  # stride(-1) != 1
        "strided": torch.rand(3, 4, 20, 52, device=device)[..., ::2],  # every other column
        "expanded layers": base[:1].expand(3, -1, -1, -1),  # stride 0 over layers
        "permuted batch": base.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),  # leading dims not flattenable
    }
    for name, view in views.items():
        assert not view.is_contiguous(), name
        assignment, status = solve(view, counts)
        expected_assignment, expected_status = solve(view.contiguous(), counts)
        assert torch.equal(assignment, expected_assignment) and torch.equal(status, expected_status), name
    assert_matches_scipy(views["strided"], counts, exact_indices=True)


def test_counts_broadcast_over_layers_are_read_in_place(device):
    # The op reads a [B] vector expanded to [L, B] without copying it; the result equals a materialized [L, B].
    op = torch.ops.detr_fast.linear_assignment
    cost = torch.rand(3, 4, 9, 7, device=device)
    counts = torch.tensor([7, 0, 3, 5], device=device)
    for layers_counts in (counts.expand(3, 4), counts[None].expand(1, 4).expand(3, 4), torch.stack([counts] * 3)):
        assignment, status = op(cost, layers_counts)
        expected_assignment, expected_status = op(cost, layers_counts.contiguous().clone())
        assert torch.equal(assignment, expected_assignment) and torch.equal(status, expected_status)
    assert_matches_scipy(cost, counts, exact_indices=True)
    distinct = torch.tensor([[7, 0, 3, 5], [1, 2, 3, 4], [0, 0, 7, 7]], device=device)  # per layer: no shortcut
    assert_matches_scipy(cost, distinct, exact_indices=True)


def test_opcheck(device):
    op = torch.ops.detr_fast.linear_assignment.default
    samples = [
        (torch.rand(2, 3, 10, 7, device=device), torch.tensor([7, 0, 4], device=device).expand(2, 3).contiguous()),
        (
            torch.rand(4, 9, 12, device=device, dtype=torch.float64).transpose(-1, -2),
            torch.full((4,), 9, device=device),
        ),
        (torch.rand(2, 6, 6, device=device).half(), torch.tensor([6, 7], device=device)),  # status 3 included
        (torch.full((1, 3, 3), float("nan"), device=device), torch.tensor([3], device=device)),
    ]
    for cost, counts in samples:
        torch.library.opcheck(op, (cost, counts))


def test_meta_tensors_give_the_output_shapes():
    assignment, status = linear_assignment(torch.empty(6, 2, 9, 4, device="meta"), strict=False)
    assert assignment.shape == (6, 2, 9) and assignment.dtype == torch.int64 and assignment.device.type == "meta"
    assert status.shape == (6, 2) and status.dtype == torch.uint8


def test_op_errors_name_the_argument(device):
    op = torch.ops.detr_fast.linear_assignment
    with pytest.raises(RuntimeError, match=r"num_targets has shape \[2\], expected cost's batch shape \[3\]"):
        op(torch.rand(3, 4, 5, device=device), torch.tensor([1, 2], device=device))
    with pytest.raises(RuntimeError, match="num_targets must be int64"):
        op(torch.rand(3, 4, 5, device=device), torch.tensor([1, 2, 3], device=device, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cost must be float16, bfloat16, float32 or float64"):
        op(torch.ones(3, 4, 5, device=device, dtype=torch.int64), torch.tensor([1, 2, 3], device=device))
    with pytest.raises(RuntimeError, match=r"cost must be \[\.\.\., N, M\]"):
        op(torch.rand(5, device=device), torch.tensor(1, device=device))


def test_compiles_fullgraph_with_strict_false(device):
    def match(logits: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cost = -logits.softmax(-1)  # [L, B, N, M]
        return linear_assignment(cost, counts, strict=False)

    logits = torch.randn(2, 3, 11, 8, device=device)
    counts = torch.tensor([8, 5, 0], device=device)
    with backend("kernel"):
        expected = match(logits, counts)  # eager first: detr_fast.dispatch probes the extension outside the graph
        compiled = torch.compile(match, fullgraph=True)
        assignment, status = compiled(logits, counts)
    assert torch.equal(assignment, expected[0]) and torch.equal(status, expected[1])
    assert (status == STATUS_OK).all()


CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


@pytest.mark.parametrize("sanitizer", [None, "thread"])
def test_group_logic_of_the_cuda_twin_on_host_threads(tmp_path, sanitizer):
    # csrc/simulated_group_check.cc runs the header's solver with groups of 4 and 32 host threads in place of a
    # warp or block (barriers for syncs) and requires the serial twin's exact result; under ThreadSanitizer a
    # missing sync also shows as a race. This checks the CUDA twin's parallel logic without a GPU.
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("needs a C++20 compiler (g++ or $CXX)")
    flags = ["-O2"] if sanitizer is None else ["-O1", "-g", f"-fsanitize={sanitizer}"]
    if sanitizer is not None:
        probe = subprocess.run(
            [compiler, *flags, "-x", "c++", "-", "-o", str(tmp_path / "probe")],
            input="int main() { return 0; }",
            capture_output=True,
            text=True,
        )
        if probe.returncode != 0:
            pytest.skip(f"{compiler} cannot build with -fsanitize={sanitizer}: {probe.stderr.strip()[:200]}")
    binary = tmp_path / "simulated_group_check"
    build = subprocess.run(
        [
            compiler,
            "-std=c++20",
            "-pthread",
            *flags,
            f"-I{CSRC}",
            os.path.join(CSRC, "simulated_group_check.cc"),
            "-o",
            str(binary),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    trials = "400" if sanitizer is None else "60"
    run = subprocess.run([str(binary), "0", trials], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("0 mismatches"), run.stdout + run.stderr[-3000:]


def test_cpu_results_equal_on_every_thread_count():
    cost = torch.rand(64, 30, 20)
    counts = torch.randint(0, 21, (64,))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = solve(cost, counts)
    finally:
        torch.set_num_threads(threads)
    parallel = solve(cost, counts)
    assert torch.equal(serial[0], parallel[0]) and torch.equal(serial[1], parallel[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: compares the CUDA and CPU twins")
def test_cuda_twin_equals_cpu_twin_including_ties():
    # The twins run one algorithm with one tie-break order, so even among tied optima they agree exactly.
    cost = torch.randint(0, 3, (6, 32, 100, 50), dtype=torch.float64)
    counts = torch.randint(0, 51, (32,))
    cpu = solve(cost, counts)
    cuda = solve(cost.cuda(), counts.cuda())
    assert torch.equal(cpu[0], cuda[0]) and torch.equal(cpu[1], cuda[1])
