"""The reference attention and projection against PyTorch's own attention and linear layers."""

import pytest
import torch
import torch.nn.functional as F

from detr_fast.reference import attention, qkv_projection


@pytest.mark.parametrize("batch,length,source,heads,dim", [(2, 13, 77, 2, 16), (1, 100, 131, 8, 32)])
def test_matches_sdpa_with_padding_mask(device, batch, length, source, heads, dim):
    q = torch.randn(batch, length, heads, dim, device=device, dtype=torch.float64)
    k = torch.randn(batch, source, heads, dim, device=device, dtype=torch.float64)
    v = torch.randn(batch, source, heads, dim, device=device, dtype=torch.float64)
    lengths = torch.randint(1, source + 1, (batch,), device=device)
    mask = torch.arange(source, device=device)[None] >= lengths[:, None]  # True = padding
    ours = attention(q, k, v, mask)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=~mask[:, None, None, :]
    ).transpose(1, 2)
    torch.testing.assert_close(ours, expected)


def test_fully_padded_rows_are_zero_not_nan(device):
    q, k, v = (torch.randn(2, 5, 2, 16, device=device) for _ in range(3))
    mask = torch.zeros(2, 5, dtype=torch.bool, device=device)
    mask[1] = True
    out = attention(q, k, v, mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_custom_scale(device):
    q, k, v = (torch.randn(1, 4, 1, 8, device=device, dtype=torch.float64) for _ in range(3))
    probs = torch.softmax((q[0, :, 0] @ k[0, :, 0].T) * 0.1, -1)
    torch.testing.assert_close(attention(q, k, v, scale=0.1)[0, :, 0], probs @ v[0, :, 0])


def test_qkv_projection_adds_pos_to_the_first_rows_only(device):
    x, pos = torch.randn(2, 7, 16, device=device, dtype=torch.float64), torch.randn(2, 7, 16, device=device, dtype=torch.float64)
    weight, bias = torch.randn(48, 16, device=device, dtype=torch.float64), torch.randn(48, device=device, dtype=torch.float64)
    out = qkv_projection(x, pos, weight, bias, pos_rows=32)
    torch.testing.assert_close(out[..., :32], (x + pos) @ weight[:32].T + bias[:32])
    torch.testing.assert_close(out[..., 32:], x @ weight[32:].T + bias[32:])
    torch.testing.assert_close(qkv_projection(x, pos, weight, None, 48), (x + pos) @ weight.T)
    torch.testing.assert_close(qkv_projection(x, None, weight, bias, 32), x @ weight.T + bias)
