"""The extension's bilinear_points_cpu (csrc/bilinear_points_cpu.cpp): bilinearly upsampled values at listed pixels
bit for bit F.interpolate's on the CPU (given UpsampledMaps' taps; the dense comparisons over many shapes are in
tests/processing/test_upsampled_maps.py), points in any order and repeated, an empty list, named errors for bad
arguments and points or taps outside the maps, and its registration (opcheck, torch.compile)."""

import pytest
import torch
import torch.nn.functional as F

from detr_fast.dispatch import EXTENSION_KERNELS
from detr_fast.processing.upsampled_maps import _taps

pytestmark = pytest.mark.skipif(
    "cpu" not in EXTENSION_KERNELS["bilinear_points_cpu"], reason="detr_fast._C is not built with bilinear_points_cpu"
)


def problem(points: int = 500, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(4, 23, 31, generator=generator)
    size = (97, 123)
    k = torch.randint(0, 4, (points,), generator=generator)
    y = torch.randint(0, size[0], (points,), generator=generator)
    x = torch.randint(0, size[1], (points,), generator=generator)
    rows, cols = _taps(23, size[0], maps.device), _taps(31, size[1], maps.device)
    return maps, size, (k, y, x, rows[6], rows[7], cols[6], cols[7])


def test_values_at_points_in_any_order():
    maps, size, args = problem()
    got = torch.ops.detr_fast.bilinear_points_cpu(maps, *args)
    k, y, x = args[:3]
    dense = F.interpolate(maps[None], size, mode="bilinear", align_corners=False)[0]
    assert torch.equal(got, dense[k, y, x])
    empty = torch.zeros(0, dtype=torch.int64)
    assert torch.ops.detr_fast.bilinear_points_cpu(maps, empty, empty, empty, *args[3:]).shape == (0,)


def test_bad_arguments_and_points_outside_are_named():
    maps, _, (k, y, x, row_index, row_weight, col_index, col_weight) = problem(10)
    op = torch.ops.detr_fast.bilinear_points_cpu
    with pytest.raises(RuntimeError, match="detr_fast::bilinear_points_cpu: maps must be \\[K, h, w\\] float32"):
        op(maps.double(), k, y, x, row_index, row_weight, col_index, col_weight)
    with pytest.raises(RuntimeError, match="y and x must be int64 of map_index's shape"):
        op(maps, k, y[:5], x, row_index, row_weight, col_index, col_weight)
    with pytest.raises(RuntimeError, match="row_weight must be float32 of row_index's shape"):
        op(maps, k, y, x, row_index, row_weight[:3], col_index, col_weight)
    outside = k.clone()
    outside[3] = 4  # 4 maps: 0..3
    with pytest.raises(RuntimeError, match="a point or a tap lies outside the maps \\(\\[K=4, h=23, w=31\\]"):
        op(maps, outside, y, x, row_index, row_weight, col_index, col_weight)
    with pytest.raises(RuntimeError, match="a point or a tap lies outside the maps"):
        op(maps, k, y, x + 1000, row_index, row_weight, col_index, col_weight)
    with pytest.raises(RuntimeError, match="a point or a tap lies outside the maps"):
        op(maps[:, :5], k, y, x, row_index, row_weight, col_index, col_weight)  # taps read rows past 5


def test_opcheck_and_compile():
    maps, _, args = problem(50)
    torch.library.opcheck(torch.ops.detr_fast.bilinear_points_cpu.default, (maps, *args))
    op = torch.ops.detr_fast.bilinear_points_cpu
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(maps, *args), torch.ops.detr_fast.bilinear_points_cpu(maps, *args))
