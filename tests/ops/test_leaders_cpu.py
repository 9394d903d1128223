"""The extension's leaders_cpu (csrc/leaders_cpu.cpp) against torch: per column of [K, P] maps the largest value,
the largest of the other rows and the first row holding the largest (as argmax), on ties, one map, float64 and odd
column counts; its registration (opcheck, the fake implementation under torch.compile)."""

import pytest
import torch

from detr_fast.dispatch import EXTENSION_KERNELS

pytestmark = pytest.mark.skipif(
    "cpu" not in EXTENSION_KERNELS["leaders_cpu"], reason="detr_fast._C is not built with leaders_cpu"
)


def expected(maps):
    best, winner = maps.max(0)  # the first maximum
    others = maps.scatter(0, winner[None], float("-inf"))  # the winner's own entry out, its ties stay
    return best, others.max(0).values, winner


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (2, 1), (3, 1025), (250, 2111), (40, 3000)])
def test_equals_torch(dtype, shape):
    generator = torch.Generator().manual_seed(shape[1])
    maps = torch.randn(shape, generator=generator, dtype=dtype)
    maps[:, ::5] = maps[:, ::5].round()  # exact ties in every fifth column: the first row wins, runner-up = best
    got = torch.ops.detr_fast.leaders_cpu(maps)
    for value, want in zip(got, expected(maps), strict=True):
        assert torch.equal(value, want)
    if shape[0] == 1:
        assert (got[1] == float("-inf")).all()  # no other map


def test_strided_input_and_tie_order():
    maps = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 2.0], [3.0, 4.0, 1.0]])
    best, runner_up, winner = torch.ops.detr_fast.leaders_cpu(maps.t().contiguous().t())  # a transposed layout
    assert best.tolist() == [3.0, 5.0, 2.0] and runner_up.tolist() == [3.0, 5.0, 2.0] and winner.tolist() == [1, 0, 0]


def test_bad_arguments_are_named():
    with pytest.raises(RuntimeError, match="detr_fast::leaders_cpu: maps must be \\[K, P\\], got shape \\[3\\]"):
        torch.ops.detr_fast.leaders_cpu(torch.zeros(3))
    with pytest.raises(RuntimeError, match="maps must be float32 or float64, got Half"):
        torch.ops.detr_fast.leaders_cpu(torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="at least one map \\(K >= 1\\)"):
        torch.ops.detr_fast.leaders_cpu(torch.zeros(0, 3))


def test_opcheck_and_compile():
    maps = torch.rand(5, 33)
    torch.library.opcheck(torch.ops.detr_fast.leaders_cpu.default, (maps,))
    compiled = torch.compile(lambda m: torch.ops.detr_fast.leaders_cpu(m), fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(maps), torch.ops.detr_fast.leaders_cpu(maps), strict=True):
        assert torch.equal(got, want)
