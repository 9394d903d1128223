"""UpsampledMaps' argmax and count_at_least against upsampling with F.interpolate and deciding on the result:
the same decisions, bit for bit, on random maps (every cell undecided), disc-shaped maps like a trained model's
(most cells settled), near ties routed past the margin, exact ties, thresholds at corner values, down- and
same-size sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detr_fast import backend
from detr_fast.dispatch import EXTENSION_KERNELS
from detr_fast.processing import upsampled_maps
from detr_fast.processing.upsampled_maps import BilinearGrid, UpsampledMaps

SHAPES = [  # K, (h, w), (H, W)
    (1, (5, 7), (20, 29)),
    (3, (10, 13), (37, 51)),
    (7, (50, 67), (200, 267)),
    (40, (9, 11), (50, 47)),  # non-integer factors
    (5, (40, 50), (17, 23)),  # downsampling
    (4, (9, 9), (9, 9)),  # the same size
]


def dense(maps, size, scale=None):
    upsampled = F.interpolate(maps[None], size, mode="bilinear", align_corners=False)[0]  # [K, H, W]
    return upsampled if scale is None else upsampled * scale[:, None, None]


def random_maps(k, size, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(k, *size, generator=generator).pow(3), torch.rand(k, generator=generator)


def disc_maps(k, size, seed):
    """Mask probabilities of discs, a trained model's kind: most cells have one clear winner."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    centre = torch.rand(k, 2, 1, 1, generator=generator) * torch.tensor(size).view(1, 2, 1, 1)
    radius = 2 + torch.rand(k, 1, 1, generator=generator) * min(size) / 3
    distance = ((rows - centre[:, 0]) ** 2 + (cols - centre[:, 1]) ** 2).sqrt()
    return torch.sigmoid((radius - distance) * 2), torch.rand(k, generator=generator) * 0.5 + 0.5


@pytest.fixture(params=["extension", "torch, one block", "torch, blocks of a few pixels"])
def paths(request, monkeypatch):
    """The leaders and the boundary values computed by the extension's ops (leaders_cpu, bilinear_points_cpu), or
    by PyTorch ops (the other devices' path, and the CPU's without the extension), the leaders over all pixels at
    once or block by block (a few pixels each, an uneven last one)."""
    if request.param == "extension":
        if any("cpu" not in EXTENSION_KERNELS[op] for op in ("leaders_cpu", "bilinear_points_cpu")):
            pytest.skip("detr_fast._C is not built with leaders_cpu and bilinear_points_cpu")
        yield
        return
    if request.param.endswith("few pixels"):
        monkeypatch.setattr(upsampled_maps, "PIXEL_BLOCK_BYTES", 300)
    with backend("reference"):
        yield


@pytest.mark.usefixtures("paths")
@pytest.mark.parametrize("make", [random_maps, disc_maps])
@pytest.mark.parametrize("k, in_size, size", SHAPES)
@pytest.mark.parametrize("scaled", [False, True])
def test_decisions_equal_upsampling_with_interpolate(make, k, in_size, size, scaled):
    maps, scale = make(k, in_size, seed=k)
    scale = scale if scaled else None
    upsampled = dense(maps, size, scale)
    result = UpsampledMaps(maps, size, scale).argmax()
    assert torch.equal(result.map(), upsampled.argmax(0))
    assert torch.equal(result.counts(k), torch.bincount(upsampled.argmax(0).flatten(), minlength=k))
    lookup = torch.arange(k, dtype=torch.int32) * 3 + 1
    assert torch.equal(result.map(lookup), lookup[upsampled.argmax(0)])
    for threshold in (0.0, 0.05, 0.3, 0.5, 2.0):
        expected = (upsampled >= threshold).sum((1, 2))
        assert torch.equal(UpsampledMaps(maps, size, scale).count_at_least(threshold), expected), threshold


@pytest.mark.usefixtures("paths")
# Upsampling by the mask head's stride and more; with small input widths and when downsampling, PyTorch's CPU kernel
# rounds otherwise (an ulp off in a few percent of the pixels), which only a tie within an ulp could turn into
# another decision (the decision tests above cover those shapes).
@pytest.mark.parametrize("in_size, size", [((23, 31), (97, 123)), ((50, 67), (200, 267)), ((200, 267), (800, 1066))])
def test_values_are_interpolates_bit_for_bit(in_size, size):
    maps, _ = random_maps(3, in_size, seed=1)
    grid = BilinearGrid(maps.shape[-2:], size, maps.device)
    k, y, x = torch.meshgrid(torch.arange(3), torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    values = grid.values(maps, k.flatten(), y.flatten(), x.flatten()).view(3, *size)
    assert torch.equal(values, dense(maps, size))


@pytest.mark.usefixtures("paths")
def test_only_the_boundaries_are_upsampled():
    maps, scale = disc_maps(20, (100, 133), seed=2)
    size = (400, 532)
    result = UpsampledMaps(maps, size, scale).argmax()
    assert 0 < len(result.y) < 0.15 * size[0] * size[1]  # the band along the boundaries, not the image
    assert torch.equal(result.map(), dense(maps, size, scale).argmax(0))


@pytest.mark.usefixtures("paths")
def test_near_and_exact_ties():
    maps, _ = disc_maps(6, (30, 40), seed=3)
    maps[1] = torch.nextafter(maps[0], torch.tensor(2.0))  # one ulp above map 0: blends round to either or a tie
    maps[3] = maps[2]  # an exact tie: the first map wins, as argmax
    maps[4, ::3] = maps[5, ::3] = 0.25  # ties on whole rows between the last two
    size = (121, 157)
    result = UpsampledMaps(maps, size).argmax()
    expected = dense(maps, size).argmax(0)
    assert torch.equal(result.map(), expected)
    assert not (expected == 3).any() and (expected == 0).any() and (expected == 1).any()
    corner_value = float(maps[2, 10, 10])  # a threshold met exactly at a corner
    assert torch.equal(
        UpsampledMaps(maps, size).count_at_least(corner_value), (dense(maps, size) >= corner_value).sum((1, 2))
    )


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="UpsampledMaps: maps must hold 1 to 32767 maps, got 0"):
        UpsampledMaps(torch.zeros(0, 4, 4), (8, 8))
    with pytest.raises(ValueError, match=r"UpsampledMaps: scale must be \[3\], one per map, got \(2,\)"):
        UpsampledMaps(torch.zeros(3, 4, 4), (8, 8), torch.ones(2))
