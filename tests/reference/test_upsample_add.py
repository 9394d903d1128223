"""The upsample_add reference against the plain formula (F.interpolate, then a broadcast add) and against explicit
source indices (PyTorch's nearest rule, floor(dst * in / out) in float32), with its output's layout and gradients."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detr_fast import reference


@pytest.mark.parametrize("sizes", [(5, 7, 11, 15), (4, 4, 8, 8), (9, 7, 5, 3), (3, 3, 3, 3)], ids=str)
def test_reference_equals_upsample_plus_add_and_the_index_rule(sizes):
    h, w, height, width = sizes
    features, adapted = torch.randn(2, 3, 6, h, w), torch.randn(2, 6, height, width)
    got = reference.upsample_add(features, adapted)
    plain = F.interpolate(features.flatten(0, 1), size=(height, width), mode="nearest").unflatten(0, (2, 3))
    assert torch.equal(got, plain + adapted[:, None])
    rows = np.minimum(np.floor(np.arange(height, dtype=np.float32) * np.float32(h / height)), h - 1).astype(int)
    cols = np.minimum(np.floor(np.arange(width, dtype=np.float32) * np.float32(w / width)), w - 1).astype(int)
    explicit = features[..., torch.from_numpy(rows)[:, None], torch.from_numpy(cols)[None, :]] + adapted[:, None]
    assert torch.equal(got, explicit)
    assert got.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


def test_gradients_sum_over_copies_and_queries():
    features = torch.randn(2, 3, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    adapted = torch.randn(2, 4, 4, 6, dtype=torch.float64, requires_grad=True)
    reference.upsample_add(features, adapted).sum().backward()
    assert torch.equal(features.grad, torch.full_like(features, 4.0))  # exactly 2x: each pixel copied 2 x 2 times
    assert torch.equal(adapted.grad, torch.full_like(adapted, 3.0))  # three queries
