"""The Triton projection kernel (positional addition fused into the GEMM) against an fp64 reference.

Forward and the gradients of x, pos, weight and bias, with the low-precision criterion and tolerance table of
tests/ops/test_attention.py. torch.compile(fullgraph=True) of a block using this op is tested there too.
"""

import pytest
import torch

from detr_fast import backend, ops, reference
from detr_fast.kernels import qkv_projection as qkv_projection_kernels

from ..helpers import DTYPES, assert_within_low_precision, skip_unsupported

# (x shape, channels C, output rows R, pos_rows P (None: no pos), layout of x and pos, bias): the model's three
# uses, plus the corners.
# C = 20 makes the interpreter's 32-wide feature tiles straddle P (mixed tiles) and leaves a ragged channel block.
SMALL_CASES = {
    "self-attention": ((2, 37), 20, 60, 40, "contiguous", True),
    "cross-kv-transposed-memory": ((2, 37), 20, 40, 20, "transposed", True),  # the encoder input: a [B, C, S] view
    "queries-all-rows-pos": ((3, 12), 32, 32, 32, "contiguous", True),
    "no-pos-rows": ((2, 9), 20, 48, 0, "contiguous", True),
    "without-pos": ((2, 9), 20, 48, None, "contiguous", True),
    "2d-x-no-bias": ((23,), 24, 72, 48, "contiguous", False),
}
LARGE_CASES = {
    "encoder-self-attention": ((8, 1050), 256, 768, 512, "transposed", True),
    "decoder-self-attention": ((8, 100), 256, 768, 512, "contiguous", True),
    "decoder-cross-kv": ((8, 1050), 256, 512, 256, "contiguous", True),
    "decoder-queries": ((8, 100), 256, 256, 256, "contiguous", True),
}
CASES = [pytest.param(*c, id=name) for name, c in SMALL_CASES.items()] + [
    pytest.param(*c, id=name, marks=pytest.mark.slow) for name, c in LARGE_CASES.items()
]


def make_inputs(lead, channels, rows, pos_rows, layout, bias, dtype, device):
    """x and pos [*lead, C] (contiguous, or transposed views of [B, C, S] as the backbone's flattened features),
    weight [R, C] at the scale of nn.Linear's init, bias [R]; all leaves that need gradients."""
    if layout == "transposed":
        x = torch.randn(lead[0], channels, *lead[1:], device=device, dtype=dtype).transpose(1, 2)
        pos = torch.randn(lead[0], channels, *lead[1:], device=device, dtype=dtype).transpose(1, 2)
    else:
        x, pos = (torch.randn(*lead, channels, device=device, dtype=dtype) for _ in range(2))
    weight = torch.randn(rows, channels, device=device, dtype=dtype) * channels**-0.5
    leaves = {"x": x, "pos": None if pos_rows is None else pos, "weight": weight}
    if bias:
        leaves["bias"] = torch.randn(rows, device=device, dtype=dtype)
    return {name: t.requires_grad_() for name, t in leaves.items() if t is not None}


def project(fn, leaves, pos_rows, grad_out=None):
    """fn(x, pos, weight, bias, pos_rows) and, given grad_out, the gradients of every leaf."""
    out = fn(leaves["x"], leaves.get("pos"), leaves["weight"], leaves.get("bias"), pos_rows or 0)
    if grad_out is None:
        return out, None
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True, materialize_grads=True)
    return out, dict(zip(leaves, grads, strict=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,channels,rows,pos_rows,layout,bias", CASES)
def test_forward_and_gradients_match_fp64(
    device,
    dtype,
    lead,
    channels,
    rows,
    pos_rows,
    layout,
    bias,
    request,
    poisoned_allocations,  # noqa: F811
):
    skip_unsupported(device, dtype, large=request.node.get_closest_marker("slow") is not None)
    leaves = make_inputs(lead, channels, rows, pos_rows, layout, bias, dtype, device)
    grad_out = torch.randn(*lead, rows, device=device, dtype=dtype)
    with backend("kernel"):
        out, grads = project(ops.qkv_projection, leaves, pos_rows, grad_out)
    lowp_out, lowp_grads = project(reference.qkv_projection, leaves, pos_rows, grad_out)
    exact_leaves = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}
    exact_out, exact_grads = project(reference.qkv_projection, exact_leaves, pos_rows, grad_out.double())
    assert out.shape == (*lead, rows)
    assert_within_low_precision("out", out, lowp_out, exact_out, dtype)
    for name in leaves:
        if pos_rows == 0 and name == "pos":  # no row reads pos: its gradient is zero
            assert (grads[name] == 0).all()
            continue
        assert_within_low_precision(f"grad {name}", grads[name], lowp_grads[name], exact_grads[name], dtype)


def test_pos_rows_split_is_exact_in_fp32(device):
    """Rows below pos_rows read x + pos and the rest read x alone, to fp32 rounding, at every boundary offset
    relative to the kernel's tiles (including a boundary inside a tile)."""
    x, pos = torch.randn(2, 7, 20, device=device), torch.randn(2, 7, 20, device=device)
    weight, bias = torch.randn(53, 20, device=device), torch.randn(53, device=device)
    for pos_rows in (1, 31, 32, 33, 52, 53):
        with backend("kernel"):
            out = ops.qkv_projection(x, pos, weight, bias, pos_rows)
        torch.testing.assert_close(out[..., :pos_rows], (x + pos) @ weight[:pos_rows].T + bias[:pos_rows])
        torch.testing.assert_close(out[..., pos_rows:], x @ weight[pos_rows:].T + bias[pos_rows:])


def test_opcheck(device):
    x = torch.randn(2, 5, 24, device=device, requires_grad=True)
    pos = torch.randn(2, 5, 24, device=device, requires_grad=True)
    weight = torch.randn(40, 24, device=device, requires_grad=True)
    bias = torch.randn(40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.detr_fast.qkv_projection.default, (x, pos, weight, bias, 24))
    torch.library.opcheck(torch.ops.detr_fast.qkv_projection.default, (x, None, weight, None, 0))


def test_kernel_backend_runs_the_kernel_and_reference_backend_does_not(device, monkeypatch):
    calls = []
    launch = qkv_projection_kernels.qkv_projection_forward
    monkeypatch.setattr(qkv_projection_kernels, "qkv_projection_forward", lambda *a: calls.append(1) or launch(*a))
    x = torch.randn(3, 16, device=device)
    weight = torch.randn(32, 16, device=device)
    with backend("reference"):
        ops.qkv_projection(x, x, weight, None, 16)
    assert calls == []
    with backend("kernel"):
        ops.qkv_projection(x, x, weight, None, 16)
    assert calls == [1]


def test_bad_inputs_raise(device):
    x = torch.randn(3, 16, device=device)
    weight = torch.randn(32, 16, device=device)
    with backend("kernel"), pytest.raises(TypeError, match="weight is float16 but x is float32"):
        ops.qkv_projection(x, x, weight.half(), None, 16)
    with backend("kernel"), pytest.raises(RuntimeError, match="not float64"):
        ops.qkv_projection(x.double(), None, weight.double(), None, 0)
    with pytest.raises(ValueError, match=r"pos_rows must be in \[0, 32\], got 33"):
        ops.qkv_projection(x, x, weight, None, 33)


def test_autocast_runs_the_kernel_in_bf16(device):
    if device.type != "cuda":
        pytest.skip("autocast to bf16 needs cuda (the interpreter has no bf16)")
    leaves = make_inputs((4, 300), 256, 768, 512, "contiguous", True, torch.float32, device)
    grad_out = torch.randn(4, 300, 768, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with backend("kernel"):
            out, grads = project(ops.qkv_projection, leaves, 512, grad_out)
        lowp_out, lowp_grads = project(reference.qkv_projection, leaves, 512, grad_out)
    exact_leaves = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}
    exact_out, exact_grads = project(reference.qkv_projection, exact_leaves, 512, grad_out.double())
    assert out.dtype == lowp_out.dtype == torch.bfloat16
    assert_within_low_precision("out (autocast)", out, lowp_out, exact_out, torch.bfloat16)
    for name in leaves:
        assert grads[name].dtype == torch.float32
        assert_within_low_precision(
            f"grad {name} (autocast)",
            grads[name].bfloat16(),
            lowp_grads[name].bfloat16(),
            exact_grads[name],
            torch.bfloat16,
        )
