"""The Triton attention kernels against an fp64 reference: forward, every gradient, padding, dropout, registration.

On CPU the kernels run in Triton's interpreter (tests/helpers.py sets TRITON_INTERPRET=1), in fp32 and fp16 on
small odd shapes; with DETR_FAST_TEST_DEVICE=cuda the same tests run natively, with bf16 and DETR-sized shapes too.

Low-precision criterion (flash-attention's): the kernel's error against fp64 must be within a small multiple of
the error of the PyTorch reference run in the same dtype, plus a small floor relative to the values' magnitude.
"""

import contextlib
import math
import subprocess
import sys

import pytest
import torch

from detr_fast import backend, ops, reference
from detr_fast.kernels import attention as attention_kernels
from detr_fast.kernels import utils as kernel_utils

from ..helpers import DTYPES, assert_within_low_precision, skip_unsupported

# (batch, queries L, keys S, heads, head dim, layout): "self" takes q, k, v from one [B, L, 3, H, D] projection,
# "cross" takes q from [B, L, H, D] and k, v from one [B, S, 2, H, D] projection, as the model does.
SMALL_SHAPES = [(2, 13, 77, 2, 16, "cross"), (2, 45, 45, 2, 32, "self"), (1, 100, 131, 1, 32, "cross")]
LARGE_SHAPES = [
    (8, 1050, 1050, 8, 32, "self"),  # DETR encoder
    (8, 100, 100, 8, 32, "self"),  # DETR decoder self-attention
    (8, 100, 1050, 8, 32, "cross"),  # DETR decoder cross-attention
    (2, 257, 257, 4, 64, "self"),
    (2, 77, 300, 2, 128, "cross"),
]
SHAPES = [pytest.param(*s, id="x".join(map(str, s))) for s in SMALL_SHAPES] + [
    pytest.param(*s, id="x".join(map(str, s)), marks=pytest.mark.slow) for s in LARGE_SHAPES
]


def padding_mask(batch, source, device, fully_padded_image=True):
    """[B, S] bool, True = padding: scattered 0-30 % padding per image, and image 1 fully padded."""
    rate = torch.rand(batch, 1, device=device) * 0.3
    mask = torch.rand(batch, source, device=device) < rate
    if fully_padded_image and batch > 1:
        mask[1] = True
    return mask


def projection_leaves(batch, length, source, heads, dim, layout, dtype, device):
    """Leaf tensors in the projections' layout and the q, k, v views the model hands to attention."""
    if layout == "self":
        qkv = torch.randn(batch, length, 3, heads, dim, device=device, dtype=dtype, requires_grad=True)
        return (qkv,), lambda qkv: qkv.unbind(2)  # [B, L, H, D] strided views
    q = torch.randn(batch, length, heads, dim, device=device, dtype=dtype, requires_grad=True)
    kv = torch.randn(batch, source, 2, heads, dim, device=device, dtype=dtype, requires_grad=True)
    return (q, kv), lambda q, kv: (q, *kv.unbind(2))


def run(attend, leaves, split, grad_out):
    """Output and gradients of the leaves of attend(q, k, v)."""
    out = attend(*split(*leaves))
    return out, torch.autograd.grad(out, leaves, grad_out)


def detached(leaves, dtype):
    return tuple(t.detach().to(dtype).requires_grad_() for t in leaves)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,length,source,heads,dim,layout", SHAPES)
def test_forward_and_gradients_match_fp64(
    device, dtype, batch, length, source, heads, dim, layout, request, poisoned_allocations
):
    skip_unsupported(device, dtype, large=request.node.get_closest_marker("slow") is not None)
    leaves, split = projection_leaves(batch, length, source, heads, dim, layout, dtype, device)
    mask = padding_mask(batch, source, device)
    grad_out = torch.randn(batch, length, heads, dim, device=device, dtype=dtype)

    with backend("kernel"):
        out, grads = run(lambda q, k, v: ops.attention(q, k, v, mask), leaves, split, grad_out)
    lowp_out, lowp_grads = run(lambda q, k, v: reference.attention(q, k, v, mask), leaves, split, grad_out)
    exact_out, exact_grads = run(
        lambda q, k, v: reference.attention(q, k, v, mask), detached(leaves, torch.float64), split, grad_out.double()
    )
    assert_within_low_precision("out", out, lowp_out, exact_out, dtype)
    for i, (got, lowp, exact) in enumerate(zip(grads, lowp_grads, exact_grads, strict=True)):
        assert_within_low_precision(f"grad of leaf {i}", got, lowp, exact, dtype)
    if batch > 1:  # image 1 has only padding keys: its queries give zeros and receive no gradient
        assert (out[1] == 0).all()
        assert (grads[0][1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fully_padded_images_give_zeros_and_zero_gradients(device, dtype, poisoned_allocations):
    q, k, v = (torch.randn(3, 21, 2, 16, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 21, dtype=torch.bool, device=device)
    mask[2, :5] = False  # image 2 keeps 5 keys
    with backend("kernel"):
        out = ops.attention(q, k, v, mask)
        grad_q, grad_k, grad_v = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.isfinite(out).all()
    assert (out[:2] == 0).all() and (out[2].abs().sum(-1) > 0).all()
    for grad in (grad_q, grad_k, grad_v):
        assert torch.isfinite(grad).all() and (grad[:2] == 0).all()
    assert (grad_k[2, 5:] == 0).all() and (grad_v[2, 5:] == 0).all()  # padding keys get no gradient
    expected = reference.attention(*(t.detach().double() for t in (q, k, v)), mask)
    torch.testing.assert_close(out.double(), expected, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=0)


@pytest.mark.parametrize(
    "batch,length,source,heads,dim,scale",
    [
        (1, 1, 1, 1, 16, None),
        (2, 3, 17, 3, 24, 0.3),
        (1, 5, 9, 2, 8, None),
        (1, 32, 64, 1, 16, None),
        (1, 5, 0, 1, 16, None),
    ],
)
def test_edge_shapes_without_mask(device, batch, length, source, heads, dim, scale, poisoned_allocations):
    """Single key, head dims that are not a power of two or below 16, exact block multiples, no keys at all
    (output zeros)."""
    q = torch.randn(batch, length, heads, dim, device=device, requires_grad=True)
    k, v = (torch.randn(batch, source, heads, dim, device=device, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(batch, length, heads, dim, device=device)
    with backend("kernel"):
        out = ops.attention(q, k, v, scale=scale)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference.attention(*inputs, scale=scale)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out.double(), allow_unused=True)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        want = torch.zeros_like(got.double()) if want is None else want  # S = 0: k and v are empty
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@contextlib.contextmanager
def allow_tf32(value: bool):
    """TF32 allowed (or not) for fp32 CUDA matmuls inside the block, through the API this torch has."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    saved = getattr(matmul, name)
    setattr(matmul, name, ("tf32" if value else "ieee") if name == "fp32_precision" else value)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


def test_fp32_dot_precision_follows_pytorchs_tf32_switch(device):
    """fp32 matmuls in the kernels are 3xTF32 (about fp32 accuracy, on the tensor cores) unless TF32 is allowed for
    PyTorch's own fp32 matmuls, through the new API or the old one."""
    with allow_tf32(False):
        assert kernel_utils.dot_precision(torch.float32) == "tf32x3"
    with allow_tf32(True):
        assert kernel_utils.dot_precision(torch.float32) == "tf32"
    assert kernel_utils.dot_precision(torch.bfloat16) == "tf32"
    # The older switch, in a fresh process: setting it here would leave torch's legacy and new precision settings
    # mixed for the tests after this one (reading allow_tf32 then raises, and inductor reads it).
    script = (
        "import torch; torch.backends.cuda.matmul.allow_tf32 = True; from detr_fast.kernels.utils import "
        "dot_precision; assert dot_precision(torch.float32) == 'tf32'"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    if device.type != "cuda":
        pytest.skip("TF32 needs a GPU: the interpreter computes every tl.dot exactly in fp32")
    # Under TF32 the kernel's error is within the criterion against a reference that uses TF32 too: SDPA's math
    # backend (cuBLAS matmuls); its memory-efficient backend computes fp32 as 3xTF32 whatever the switch says.
    with allow_tf32(True):
        check_tf32_attention(device)


def check_tf32_attention(device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves, split = projection_leaves(4, 300, 300, 4, 64, "self", torch.float32, device)
    mask = padding_mask(4, 300, device)
    grad_out = torch.randn(4, 300, 4, 64, device=device)
    with backend("kernel"):
        out, grads = run(lambda q, k, v: ops.attention(q, k, v, mask), leaves, split, grad_out)
    with sdpa_kernel(SDPBackend.MATH):
        lowp_out, lowp_grads = run(lambda q, k, v: reference.attention(q, k, v, mask), leaves, split, grad_out)
    exact_out, exact_grads = run(
        lambda q, k, v: reference.attention(q, k, v, mask), detached(leaves, torch.float64), split, grad_out.double()
    )
    assert_within_low_precision("out (tf32)", out, lowp_out, exact_out, torch.float32)
    assert_within_low_precision("grad (tf32)", grads[0], lowp_grads[0], exact_grads[0], torch.float32)


def test_backward_is_deterministic(device):
    """No atomics: two backward passes give bitwise-equal gradients (on a GPU too, where block order varies)."""
    shape = (8, 300, 4, 32) if device.type == "cuda" else (2, 45, 2, 16)
    q, k, v = (torch.randn(*shape, device=device, requires_grad=True) for _ in range(3))
    mask = padding_mask(shape[0], shape[1], device)
    grad_out = torch.randn(*shape, device=device)
    with backend("kernel"):
        out = ops.attention(q, k, v, mask)
        first = torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
        second = torch.autograd.grad(out, (q, k, v), grad_out)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def dropout_weights(q, k, mask, dropout_p, seed):
    """The dropped, rescaled probabilities [B, H, L, S] the kernel applied for `seed`, read out through one-hot
    values (output = weights @ v picks columns of the weights); the mask depends only on the seed and position."""
    batch, source, heads, dim = k.shape
    columns = []
    for start in range(0, source, dim):
        width = min(dim, source - start)
        one_hot = torch.zeros(batch, source, heads, dim, device=k.device, dtype=k.dtype)
        one_hot[:, start : start + width, :, :width] = torch.eye(width, device=k.device, dtype=k.dtype)[:, None, :]
        torch.manual_seed(seed)
        with backend("kernel"):
            out = ops.attention(q, k, one_hot, mask, dropout_p=dropout_p)  # [B, L, H, D]
        columns.append(out[..., :width].permute(0, 2, 1, 3))
    return torch.cat(columns, -1)


def test_dropout_keeps_one_minus_p_and_rescales(device):
    dropout_p = 0.3
    q, k = torch.randn(2, 64, 2, 16, device=device), torch.randn(2, 40, 2, 16, device=device)
    mask = padding_mask(2, 40, device, fully_padded_image=False)
    weights = dropout_weights(q, k, mask, dropout_p, seed=1)
    probs = (
        (torch.einsum("blhd,bshd->bhls", q.double(), k.double()) * 16**-0.5)
        .masked_fill(mask[:, None, None, :], float("-inf"))
        .softmax(-1)
    )
    kept = weights != 0
    attended = probs > 0
    assert not (kept & ~attended).any(), "dropout kept a padding key"
    fraction = kept[attended].double().mean().item()
    count = attended.sum().item()
    # 5 standard deviations of a binomial proportion over `count` draws
    assert abs(fraction - (1 - dropout_p)) < 5 * math.sqrt(dropout_p * (1 - dropout_p) / count), fraction
    torch.testing.assert_close(weights[kept].double(), probs[kept] / (1 - dropout_p), atol=1e-6, rtol=1e-5)


def test_dropout_is_reproducible_from_torch_seed(device):
    q, k, v = (torch.randn(2, 19, 2, 16, device=device) for _ in range(3))
    with backend("kernel"):
        torch.manual_seed(7)
        first = ops.attention(q, k, v, dropout_p=0.2)
        torch.manual_seed(7)
        again = ops.attention(q, k, v, dropout_p=0.2)
        other = ops.attention(q, k, v, dropout_p=0.2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_gradients_match_fp64_with_the_same_mask(device, dtype):
    """The backward regenerates the forward's dropout mask: gradients equal fp64 autograd through that mask."""
    dropout_p, seed = 0.25, 3
    batch, length, source, heads, dim = 2, 23, 37, 2, 16
    q, k, v = (torch.randn(batch, n, heads, dim, device=device, dtype=dtype) for n in (length, source, source))
    mask = padding_mask(batch, source, device)
    grad_out = torch.randn(batch, length, heads, dim, device=device, dtype=dtype)
    keep = dropout_weights(q, k, mask, dropout_p, seed) != 0  # [B, H, L, S]

    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    with backend("kernel"):
        out = ops.attention(*leaves, mask, dropout_p=dropout_p)
    grads = torch.autograd.grad(out, leaves, grad_out)

    def masked_reference(q, k, v):
        scores = torch.einsum("blhd,bshd->bhls", q, k) * dim**-0.5
        probs = scores.masked_fill(mask[:, None, None, :], float("-inf")).softmax(-1).nan_to_num(0.0)
        return torch.einsum("bhls,bshd->blhd", probs * keep / (1 - dropout_p), v)

    exact = [t.double().requires_grad_() for t in (q, k, v)]
    expected = masked_reference(*exact)
    expected_grads = torch.autograd.grad(expected, exact, grad_out.double())
    atol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=atol * 2, rtol=0)


@pytest.mark.parametrize("case", ["mask", "no-mask", "dropout"])
def test_opcheck(device, case):
    q = torch.randn(2, 5, 2, 16, device=device, requires_grad=True)
    k, v = (torch.randn(2, 7, 2, 16, device=device, requires_grad=True) for _ in range(2))
    mask = padding_mask(2, 7, device) if case != "no-mask" else None
    seed = torch.tensor([12345], device=device) if case == "dropout" else None
    dropout_p = 0.2 if case == "dropout" else 0.0
    torch.library.opcheck(torch.ops.detr_fast.attention.default, (q, k, v, mask, seed, dropout_p, 0.25))
    with torch.no_grad():
        out, lse = torch.ops.detr_fast.attention(q, k, v, mask, seed, dropout_p, 0.25)
    grad_out = torch.randn_like(out)
    # The backward op is never differentiated (no double backward): check it on inputs that need no gradient.
    q, k, v = (t.detach() for t in (q, k, v))
    torch.library.opcheck(
        torch.ops.detr_fast.attention_backward.default, (grad_out, q, k, v, out, lse, mask, seed, dropout_p, 0.25)
    )


def test_torch_compile_fullgraph(device):
    """A projection + attention block compiles with fullgraph=True (no graph break) and matches eager."""
    x = torch.randn(2, 11, 32, device=device, requires_grad=True)
    pos = torch.randn(2, 11, 32, device=device)
    weight = (torch.randn(96, 32, device=device) * 32**-0.5).requires_grad_()
    mask = padding_mask(2, 11, device, fully_padded_image=False)

    def block(x, pos, weight, mask):
        qkv = ops.qkv_projection(x, pos, weight, None, pos_rows=64)
        q, k, v = qkv.view(2, 11, 3, 2, 16).unbind(2)
        return ops.attention(q, k, v, mask).sum(-1)

    with backend("kernel"):
        eager = block(x, pos, weight, mask)
        eager_grads = torch.autograd.grad(eager.square().sum(), (x, weight))
        compiled = torch.compile(block, fullgraph=True)(x, pos, weight, mask)
        compiled_grads = torch.autograd.grad(compiled.square().sum(), (x, weight))
    # Inductor fuses and reorders the surrounding fp32 arithmetic: equal up to fp32 rounding, not bitwise.
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_kernel_backend_runs_the_kernel_and_reference_backend_does_not(device, monkeypatch):
    calls = []
    launch = attention_kernels.attention_forward
    monkeypatch.setattr(attention_kernels, "attention_forward", lambda *a: calls.append(1) or launch(*a))
    q, k, v = (torch.randn(1, 5, 1, 16, device=device) for _ in range(3))
    with backend("reference"):
        ops.attention(q, k, v)
    assert calls == []
    with backend("kernel"):
        ops.attention(q, k, v)
    assert calls == [1]


def test_unsupported_inputs_raise_under_kernel_backend(device):
    q = torch.randn(1, 3, 1, 16, device=device, dtype=torch.float64)
    with backend("kernel"), pytest.raises(RuntimeError, match="float32, float16 and bfloat16, not float64"):
        ops.attention(q, q, q)
    wide = torch.randn(1, 3, 1, 160, device=device)
    with backend("kernel"), pytest.raises(RuntimeError, match="head dims up to 128, got D=160"):
        ops.attention(wide, wide, wide)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ops.attention(wide, wide, wide, dropout_p=1.0)


def test_autocast_runs_the_kernel_in_bf16(device):
    if device.type != "cuda":
        pytest.skip("autocast to bf16 needs cuda (the interpreter has no bf16)")
    leaves, split = projection_leaves(2, 300, 300, 4, 32, "self", torch.float32, device)
    mask = padding_mask(2, 300, device)
    grad_out = torch.randn(2, 300, 4, 32, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with backend("kernel"):
            out, grads = run(lambda q, k, v: ops.attention(q, k, v, mask), leaves, split, grad_out)
        lowp_out, lowp_grads = run(lambda q, k, v: reference.attention(q, k, v, mask), leaves, split, grad_out)
    exact_out, exact_grads = run(
        lambda q, k, v: reference.attention(q, k, v, mask), detached(leaves, torch.float64), split, grad_out.double()
    )
    assert out.dtype == lowp_out.dtype == torch.bfloat16
    assert_within_low_precision("out (autocast)", out, lowp_out, exact_out, torch.bfloat16)
    assert grads[0].dtype == torch.float32  # the cast's backward returns fp32 gradients to fp32 leaves
    assert_within_low_precision(
        "grad (autocast)", grads[0].bfloat16(), lowp_grads[0].bfloat16(), exact_grads[0], torch.bfloat16
    )
