"""Decisions about bilinearly upsampled maps without upsampling them: which map is largest at each output pixel,
and how many output pixels of each map reach a threshold.

Segmentation post-processing upsamples K low-resolution maps [K, h, w] (class scores, or per-query mask
probabilities) to the image size [K, H, W] and then only asks, per output pixel, which map is largest, or, per map,
how many pixels reach a threshold. Bilinear upsampling blends the four low-resolution corners of the cell an output
pixel falls in with non-negative weights, so where one map wins at all four corners it wins the blend too, and where
all four corners of a map are above (below) a threshold so is the blend. Only the output pixels of cells where the
corners disagree, a thin band along the boundaries, need the upsampled values; those are computed exactly as
PyTorch's CPU kernel computes them (its own tap weights, read back from F.interpolate; its fused multiply-adds), so
the decisions are transformers' decisions, without the [K, H, W] tensor.

A corner counts as decided only when its margin exceeds MARGIN relative to the values, a hundred times the rounding
of the blend, so no rounding difference can turn a decided cell. On a GPU the boundary values follow the CPU
kernel's arithmetic, so a pixel where two maps tie to within an ulp may go the other way than CUDA's own
F.interpolate would send it. The same holds on the CPU for small input widths and for downsampling, where PyTorch's
kernel takes another path that rounds otherwise (an ulp off at a few percent of the pixels); upsampling by a
segmentation head's stride (the post-processing's case) is bit for bit (tests/processing/test_upsampled_maps.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dispatch import use_extension

MARGIN = 1e-5  # relative; the blend's rounding is a few float32 ulps (1.2e-7 each)
PIXEL_BLOCK_BYTES = 1 << 21  # the maps' values of one block of pixels, held in the cores' L2 caches between passes
CELLS_PER_CHUNK = 4096  # undecided cells handled at once: their [K, cells, 4] corners stay at 16 MB for K = 250


@functools.lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """PyTorch's bilinear taps along one axis (align_corners=False): for each output index the first input index
    i0 [out], the second i1 [out] (i0 + 1, or i0 at the last input) and their weights w0, w1 [out] float32, the
    very values F.interpolate uses (read back by upsampling one-hot rows); the output indices of input index r are
    start[r] ... start[r] + count[r] - 1 (i0 is non-decreasing); and the index pairs [out, 2] and weight pairs
    [out, 2] as bilinear_points_cpu reads them."""
    one_hot = torch.eye(in_size, device=device)[:, None, None, :]  # [in, 1, 1, in]
    weights = F.interpolate(one_hot, size=(1, out_size), mode="bilinear", align_corners=False)[:, 0, 0, :]  # [in, out]
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    source = (scale * (torch.arange(out_size, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    i0 = source.floor().long().clamp(max=in_size - 1).to(device)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    outputs = torch.arange(out_size, device=device)
    w0 = weights[i0, outputs]
    w1 = torch.where(i0 == i1, torch.zeros_like(w0), weights[i1, outputs])
    if not bool(((w0 + w1 - 1).abs() < 1e-5).all()):
        raise RuntimeError(f"UpsampledMaps: F.interpolate's taps for {in_size} -> {out_size} are not bilinear")
    count = torch.bincount(i0, minlength=in_size)
    start = torch.cumsum(count, 0) - count
    return i0, i1, w0, w1, start, count, torch.stack([i0, i1], 1), torch.stack([w0, w1], 1)


def _expand(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [n] -> (group [N], offset [N]) listing 0 .. counts[g] - 1 for each group g in turn (N = counts.sum())."""
    group = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    offset = torch.arange(len(group), device=counts.device) - (torch.cumsum(counts, 0) - counts)[group]
    return group, offset


def _leaders(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """maps [K, h, w] -> (winner [h, w] int64: the first map of largest value, as argmax; leads [h, w] bool: no other
    map within MARGIN of it). On the CPU the extension's leaders_cpu reads the maps once; without it, and on other
    devices, torch's max and a count against it, on the CPU by blocks of pixels whose [K, pixels] values stay in
    cache between the two passes (K = 250 maps of a few hundred pixels each: one read from memory, not three)."""
    flat = maps.flatten(1)  # [K, h * w]
    if (
        maps.device.type == "cpu"
        and maps.dtype in (torch.float32, torch.float64)
        and use_extension("UpsampledMaps", maps.device, "leaders_cpu")
    ):  # one pass: the largest, the runner-up and the first row of the largest
        best, runner_up, winner = torch.ops.detr_fast.leaders_cpu(flat)
        leads = runner_up < best - MARGIN * best.abs()  # [h * w]
        return winner.view(maps.shape[1:]), leads.view(maps.shape[1:])
    pixels = flat.shape[1]
    winner = torch.empty(pixels, dtype=torch.int64, device=maps.device)
    leads = torch.empty(pixels, dtype=torch.bool, device=maps.device)
    best = torch.empty(pixels, dtype=maps.dtype, device=maps.device)
    # a GPU reads once anyway and would pay a launch per block
    step = max(1, PIXEL_BLOCK_BYTES // (len(flat) * flat.element_size())) if maps.device.type == "cpu" else pixels
    for start in range(0, pixels, step):
        block, stop = flat[:, start : start + step], start + step
        torch.max(block, 0, out=(best[start:stop], winner[start:stop]))
        floor = best[start:stop] - MARGIN * best[start:stop].abs()
        # an int16 sum: much faster than the default int64 on the CPU
        torch.eq((block >= floor).sum(0, dtype=torch.int16), 1, out=leads[start:stop])
    return winner.view(maps.shape[1:]), leads.view(maps.shape[1:])


@functools.lru_cache(maxsize=8)
def _cell_of_pixel(in_size: tuple[int, int], size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """[H * W]: the flat index into [h * w] of each output pixel's cell (a flat gather is faster than a two-index
    one on the CPU)."""
    rows, cols = _taps(in_size[0], size[0], device)[0], _taps(in_size[1], size[1], device)[0]
    return (rows[:, None] * in_size[1] + cols[None, :]).flatten()


class BilinearGrid:
    """The bilinear upsampling (align_corners=False) of [K, h, w] maps to `size` (H, W) on `device`, by cells: a
    cell is an input pixel (r, c) with its neighbours below and right, the four corners that every output pixel
    whose first taps are r and c blends."""

    def __init__(self, in_size: tuple[int, int], size: tuple[int, int], device: torch.device):
        self.in_size, self.size = tuple(in_size), tuple(size)
        self.rows = _taps(in_size[0], size[0], device)
        self.cols = _taps(in_size[1], size[1], device)

    def pixels_per_cell(self) -> torch.Tensor:
        """[h, w] int64: how many output pixels each cell holds."""
        return self.rows[5][:, None] * self.cols[5][None, :]

    def corners(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., h, w] at each cell's four corners: (top left, top right, bottom left, bottom right), each
        [..., h, w] (the last row and column are their own neighbours, as the taps clamp there)."""
        below = torch.cat([x[..., 1:, :], x[..., -1:, :]], dim=-2)
        right = torch.cat([x[..., :, 1:], x[..., :, -1:]], dim=-1)
        below_right = torch.cat([below[..., :, 1:], below[..., :, -1:]], dim=-1)
        return x, right, below, below_right

    def all_corners(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., h, w] bool -> [..., h, w]: true at the cells whose four corners are true."""
        rows = torch.empty_like(x)
        torch.logical_and(x[..., :-1, :], x[..., 1:, :], out=rows[..., :-1, :])
        rows[..., -1, :] = x[..., -1, :]
        cells = torch.empty_like(x)
        torch.logical_and(rows[..., :-1], rows[..., 1:], out=cells[..., :-1])
        cells[..., -1] = rows[..., -1]
        return cells

    def corner_index(self, cells: torch.Tensor) -> torch.Tensor:
        """cells [n, 2] (row, column) -> [n, 4] flat indices into [h * w] of their four corners."""
        h, w = self.in_size
        row, col = cells.unbind(1)
        below, right = (row + 1).clamp(max=h - 1), (col + 1).clamp(max=w - 1)
        return torch.stack([row * w + col, row * w + right, below * w + col, below * w + right], dim=1)

    def to_output(self, x: torch.Tensor) -> torch.Tensor:
        """x [h, w] repeated over each cell's output pixels: [H, W]."""
        return x.flatten().index_select(0, _cell_of_pixel(self.in_size, self.size, x.device)).view(self.size)

    def cell_pixels(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The output pixels of cells [n, 2] (row, column), cell by cell: (pixels per cell [n], y [P], x [P])."""
        row_start, row_count = self.rows[4][cells[:, 0]], self.rows[5][cells[:, 0]]
        col_start, col_count = self.cols[4][cells[:, 1]], self.cols[5][cells[:, 1]]
        per_cell = row_count * col_count  # [n]
        cell, offset = _expand(per_cell)
        return per_cell, row_start[cell] + offset // col_count[cell], col_start[cell] + offset % col_count[cell]

    def values(self, maps: torch.Tensor, k: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Map k [P] of maps [K, h, w] float32 upsampled at output pixel (y [P], x [P]): [P], bit for bit
        F.interpolate's value on the CPU: along the width, then the height, each step a fused multiply-add (exact
        in float64, then rounded once to float32) of the first tap onto the rounded product of the second. On the
        CPU the extension's bilinear_points_cpu computes it in one pass; elsewhere (and without it) PyTorch ops."""
        if (
            maps.device.type == "cpu"
            and maps.dtype == torch.float32
            and use_extension("UpsampledMaps", maps.device, "bilinear_points_cpu")
        ):
            rows, cols = self.rows, self.cols
            return torch.ops.detr_fast.bilinear_points_cpu(maps, k, y, x, rows[6], rows[7], cols[6], cols[7])
        i0, i1, w0, w1 = (t.index_select(0, y) for t in self.rows[:4])
        j0, j1, v0, v1 = (t.index_select(0, x) for t in self.cols[:4])
        flat, width = maps.flatten(), maps.shape[-1]
        base = k * (maps.shape[-2] * width)
        top, bottom = base + i0 * width, base + i1 * width  # flat index gathers: the fast path of the CPU

        def fma(a, b, c):
            return (a.double() * b.double() + c.double()).float()

        def at(index):
            return flat.index_select(0, index)

        upper = fma(at(top + j0), v0, at(top + j1) * v1)
        lower = fma(at(bottom + j0), v0, at(bottom + j1) * v1)
        return fma(upper, w0, lower * w1)


@dataclass
class UpsampledArgmax:
    """The argmax of upsampled maps, held compactly: the winning map of each settled cell (it owns all the cell's
    output pixels) and the owners of the output pixels of the other cells."""

    grid: BilinearGrid
    winner: torch.Tensor  # [h, w] int64
    settled: torch.Tensor  # [h, w] bool
    y: torch.Tensor  # [P]: the output pixels of the unsettled cells
    x: torch.Tensor  # [P]
    owner: torch.Tensor  # [P] int64

    def map(self, lookup: torch.Tensor | None = None) -> torch.Tensor:
        """The [H, W] owner of each output pixel, or lookup [K] of it."""
        low = self.winner if lookup is None else lookup[self.winner]  # [h, w]
        full = self.grid.to_output(low)  # [H, W]
        pixel = self.y * self.grid.size[1] + self.x
        full.view(-1).index_copy_(0, pixel, self.owner if lookup is None else lookup[self.owner])
        return full

    def counts(self, maps: int) -> torch.Tensor:
        """[maps] int64: how many output pixels each map owns."""
        settled_pixels = self.grid.pixels_per_cell()[self.settled].double()
        counts = torch.bincount(self.winner[self.settled], weights=settled_pixels, minlength=maps).long()
        return counts + torch.bincount(self.owner, minlength=maps)


class UpsampledMaps:
    """F.interpolate(maps[None], size, mode="bilinear")[0] * scale[:, None, None] ([K, H, W]) without computing it:
    the decisions argmax() and count_at_least() take on it, from the maps at their own resolution and the values
    along the boundaries.

    Args:
        maps: [K, h, w] float32, finite, 1 <= K < 2**15.
        size: (H, W) of the upsampling.
        scale: [K] non-negative factors applied after the upsampling (None: 1).
    """

    def __init__(self, maps: torch.Tensor, size: tuple[int, int], scale: torch.Tensor | None = None):
        if not 1 <= len(maps) < 2**15:
            raise ValueError(f"UpsampledMaps: maps must hold 1 to 32767 maps, got {len(maps)}")
        if scale is not None and scale.shape != maps.shape[:1]:
            raise ValueError(f"UpsampledMaps: scale must be [{len(maps)}], one per map, got {tuple(scale.shape)}")
        self.maps, self.scale = maps, scale
        self.grid = BilinearGrid(maps.shape[-2:], size, maps.device)
        self.weighted = maps if scale is None else maps * scale[:, None, None]  # [K, h, w]: decisions at corners

    def values(self, k: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Upsampled, scaled map k [P] at output pixel (y [P], x [P]): [P]."""
        values = self.grid.values(self.maps, k, y, x)
        return values if self.scale is None else values * self.scale[k]

    def argmax(self) -> UpsampledArgmax:
        """The argmax over maps at each output pixel, the first map on a tie as torch.argmax (.map() gives it as
        [H, W] int64). A cell is settled when one map leads by the margin at all four corners; in the other cells
        only the maps whose largest corner reaches the best smallest corner (the candidates, usually two or three)
        are upsampled."""
        grid, weighted, device = self.grid, self.weighted, self.maps.device
        winner, leads = _leaders(weighted)
        top_left, top_right, bottom_left, bottom_right = grid.corners(winner)
        settled = (top_left == top_right) & (top_left == bottom_left) & (top_left == bottom_right)
        settled &= grid.all_corners(leads)
        unsettled = (~settled).nonzero()  # [n, 2]
        flat = weighted.flatten(1)  # [K, h * w]
        ys, xs, owners = [], [], []
        for start in range(0, len(unsettled), CELLS_PER_CHUNK):
            cells = unsettled[start : start + CELLS_PER_CHUNK]
            corner_values = flat.index_select(1, grid.corner_index(cells).flatten()).view(len(flat), -1, 4)
            floor = corner_values.amin(-1).amax(0)  # [n]: the winner reaches at least this in the whole cell
            k, cell = (corner_values.amax(-1) >= floor - MARGIN * floor.abs()).nonzero().unbind(1)  # candidates
            per_cell, y, x = grid.cell_pixels(cells)  # [n], [P], [P]
            pair, offset = _expand(per_cell[cell])
            pixel = (torch.cumsum(per_cell, 0) - per_cell)[cell[pair]] + offset  # [pairs] into [P]
            k = k[pair]
            values = self.values(k, y[pixel], x[pixel])
            top = torch.full((len(y),), float("-inf"), device=device).scatter_reduce(0, pixel, values, "amax")
            is_top = values == top[pixel]
            first = torch.full((len(y),), len(flat), device=device)
            owners.append(first.scatter_reduce(0, pixel[is_top], k[is_top], "amin"))
            ys.append(y)
            xs.append(x)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return UpsampledArgmax(grid, winner, settled, *(torch.cat(t) if t else empty for t in (ys, xs, owners)))

    def count_at_least(self, threshold: float) -> torch.Tensor:
        """How many output pixels of each map reach threshold: [K] int64. Cells whose four corners are all above
        (below) the threshold by the margin count whole (not at all); only the others are upsampled."""
        grid, weighted = self.grid, self.weighted
        slack = MARGIN * max(abs(threshold), 1e-30)
        above = grid.all_corners(weighted >= threshold + slack)  # [K, h, w]
        below = grid.all_corners(weighted < threshold - slack)
        # the pixels of the cells above, as two matrix products (exact: integers, the row sums below 2**24)
        count = ((above.float() @ grid.cols[5].float()).double() @ grid.rows[5].double()).long()  # [K]
        mixed = (~(above | below)).nonzero()  # [n, 3] (k, row, column)
        for start in range(0, len(mixed), CELLS_PER_CHUNK):
            part = mixed[start : start + CELLS_PER_CHUNK]
            per_cell, y, x = grid.cell_pixels(part[:, 1:])
            k = torch.repeat_interleave(part[:, 0], per_cell)  # [P]
            count += torch.bincount(k[self.values(k, y, x) >= threshold], minlength=len(weighted))
        return count
