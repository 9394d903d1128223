"""The reference attention and projection against the formulas written out in float64."""

import pytest
import torch

from detr_fast.reference import attention, qkv_projection


def attention_by_formula(q, k, v, mask, scale=None):
    """softmax(q k^T * scale, padding at -inf) v per batch and head, loops over nothing but einsum."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("blhd,bshd->bhls", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhls,bshd->blhd", scores.softmax(-1), v)


@pytest.mark.parametrize("batch,length,source,heads,dim", [(2, 13, 77, 2, 16), (1, 100, 131, 8, 32)])
def test_matches_the_formula_with_padding_mask(device, batch, length, source, heads, dim):
    q = torch.randn(batch, length, heads, dim, device=device, dtype=torch.float64)
    k = torch.randn(batch, source, heads, dim, device=device, dtype=torch.float64)
    v = torch.randn(batch, source, heads, dim, device=device, dtype=torch.float64)
    lengths = torch.randint(1, source + 1, (batch,), device=device)
    mask = torch.arange(source, device=device)[None] >= lengths[:, None]  # True = padding
    torch.testing.assert_close(attention(q, k, v, mask), attention_by_formula(q, k, v, mask))
    torch.testing.assert_close(attention(q, k, v), attention_by_formula(q, k, v, None))


def test_strided_projection_views(device):
    qkv = torch.randn(2, 9, 3, 2, 8, device=device, dtype=torch.float64)  # [B, L, 3, H, D] as the model makes it
    q, k, v = qkv.unbind(2)
    torch.testing.assert_close(attention(q, k, v), attention_by_formula(q, k, v, None))


def test_fully_padded_rows_are_zero_with_zero_finite_gradients(device):
    q, k, v = (torch.randn(2, 5, 2, 16, device=device, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 5, dtype=torch.bool, device=device)
    mask[0, 3:] = True
    mask[1] = True
    out = attention(q, k, v, mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    torch.testing.assert_close(out[0], attention_by_formula(q, k, v, mask)[0])
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for grad in grads:
        assert torch.isfinite(grad).all() and (grad[1] == 0).all()


def test_custom_scale(device):
    q, k, v = (torch.randn(1, 4, 1, 8, device=device, dtype=torch.float64) for _ in range(3))
    probs = torch.softmax((q[0, :, 0] @ k[0, :, 0].T) * 0.1, -1)
    torch.testing.assert_close(attention(q, k, v, scale=0.1)[0, :, 0], probs @ v[0, :, 0])


def test_qkv_projection_adds_pos_to_the_first_rows_only(device):
    x, pos = (
        torch.randn(2, 7, 16, device=device, dtype=torch.float64),
        torch.randn(2, 7, 16, device=device, dtype=torch.float64),
    )
    weight, bias = (
        torch.randn(48, 16, device=device, dtype=torch.float64),
        torch.randn(48, device=device, dtype=torch.float64),
    )
    out = qkv_projection(x, pos, weight, bias, pos_rows=32)
    torch.testing.assert_close(out[..., :32], (x + pos) @ weight[:32].T + bias[:32])
    torch.testing.assert_close(out[..., 32:], x @ weight[32:].T + bias[32:])
    torch.testing.assert_close(qkv_projection(x, pos, weight, None, 48), (x + pos) @ weight.T)
    torch.testing.assert_close(qkv_projection(x, None, weight, bias, 32), x @ weight.T + bias)
