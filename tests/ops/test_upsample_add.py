"""The fused nearest-upsample + broadcast-add kernel and the CPU path against the reference: bit-equal values (one
rounding of a float32 sum in all) at odd channel counts, non-integer, integer, unit and downscaling factors, any
input strides; the gradients; the output's layout; registration (opcheck, torch.compile) and the errors.

On CPU the kernel runs in Triton's interpreter (backend "kernel", TRITON_INTERPRET=1 from tests/helpers.py), natively
with DETR_FAST_TEST_DEVICE=cuda.
"""

import pytest
import torch

from detr_fast import backend, ops, reference
from detr_fast.dispatch import triton_or_cpu_path
from detr_fast.kernels import upsample_add as upsample_add_kernels

from ..helpers import compile_for_sm90, skip_unsupported

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, Q, C, h, w, H, W): the mask head's stages (about 2x, sizes rounded up by strided convolutions), exactly 2x,
# unit scale, a downscale, one channel, and more channels than one block
SHAPES = [
    pytest.param((2, 3, 5, 4, 6, 7, 11), id="2x3x5-4x6-to-7x11"),
    pytest.param((1, 4, 8, 5, 5, 10, 10), id="1x4x8-5x5-to-10x10"),
    pytest.param((2, 2, 3, 6, 9, 6, 9), id="unit-scale"),
    pytest.param((1, 3, 4, 9, 7, 5, 3), id="downscale"),
    pytest.param((2, 5, 1, 3, 4, 13, 17), id="one-channel"),
    pytest.param((1, 2, 37, 3, 3, 6, 5), id="37-channels"),
]


def kernel(features, adapted):
    with backend("kernel"):
        assert triton_or_cpu_path("upsample_add", features.device) == "triton"
        return ops.upsample_add(features, adapted)


def cpu_path(features, adapted):
    if features.device.type != "cpu":
        pytest.skip("the CPU path is for CPU tensors")
    assert triton_or_cpu_path("upsample_add", features.device) == "cpu"
    return ops.upsample_add(features, adapted)


PATHS = [pytest.param(kernel, id="triton"), pytest.param(cpu_path, id="cpu")]


def inputs(shape, device, dtype, channels_last=False):
    batch, queries, channels, h, w, height, width = shape
    features = torch.randn(batch, queries, channels, h, w, device=device).to(dtype)
    if channels_last:  # as the mask head hands them over: channels-last per map
        features = features.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (batch, queries))
    return features, torch.randn(batch, channels, height, width, device=device).to(dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_values_equal_the_reference_bit_for_bit(device, path, dtype, shape, channels_last, poisoned_allocations):
    skip_unsupported(device, dtype)
    features, adapted = inputs(shape, device, dtype, channels_last)
    got, want = path(features, adapted), reference.upsample_add(features, adapted)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want)
    assert got.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    assert want.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:4])
@pytest.mark.parametrize("channels_last_grad", [False, True], ids=["nchw-grad", "channels-last-grad"])
def test_gradients_match_the_reference(device, path, shape, channels_last_grad):
    features, adapted = inputs(shape, device, torch.float64 if device.type == "cpu" else torch.float32)
    grad = torch.randn(shape[0] * shape[1], shape[2], *shape[-2:], device=device, dtype=features.dtype)
    if channels_last_grad:  # as the convolution that follows returns it
        grad = grad.contiguous(memory_format=torch.channels_last)
    grad = grad.unflatten(0, shape[:2])
    results = []
    for fn in (path, reference.upsample_add):
        leaves = [features.detach().requires_grad_(), adapted.detach().requires_grad_()]
        results.append(torch.autograd.grad(fn(*leaves), leaves, grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12 if got.dtype == torch.float64 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_empty_batch_and_no_queries(device, path):
    for shape in ((0, 3, 4, 2, 2, 4, 4), (2, 0, 4, 2, 2, 4, 4)):
        features, adapted = inputs(shape, device, torch.float32)
        got = path(features, adapted)
        assert got.shape == (*shape[:3], 4, 4) and torch.equal(got, reference.upsample_add(features, adapted))


def test_opcheck(device):
    features, adapted = inputs((2, 3, 5, 4, 6, 7, 11), device, torch.float32)
    for op in (torch.ops.detr_fast.upsample_add.default, torch.ops.detr_fast.upsample_add_cpu.default):
        with backend("kernel"):
            torch.library.opcheck(op, (features.requires_grad_(), adapted))
            torch.library.opcheck(op, (features.detach(), adapted.requires_grad_()))


def test_torch_compile_fullgraph(device):
    """A fusion stage (upsample_add, then a 3x3 convolution) compiles whole and matches eager, gradients included."""
    features, adapted = inputs((2, 3, 4, 4, 5, 8, 9), device, torch.float32)
    weight = torch.randn(4, 4, 3, 3, device=device)

    def stage(features, adapted):
        fused = ops.upsample_add(features, adapted)
        return torch.nn.functional.conv2d(fused.flatten(0, 1), weight, padding=1).square().sum()

    leaves = [features.requires_grad_(), adapted.requires_grad_()]
    eager = [t.detach().clone().requires_grad_() for t in leaves]
    got = torch.compile(stage, fullgraph=True, backend="aot_eager")(*leaves)
    want = stage(*eager)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    for leaf, reference_leaf in zip(leaves, eager, strict=True):
        torch.testing.assert_close(leaf.grad, reference_leaf.grad)


def test_errors_name_the_op_and_argument(device):
    features, adapted = inputs((2, 3, 5, 4, 6, 7, 11), device, torch.float32)
    with pytest.raises(ValueError, match="upsample_add: features must have 5 dims"):
        ops.upsample_add(features[0], adapted)
    with pytest.raises(ValueError, match=r"upsample_add: adapted has shape \(1, 5, 7, 11\), expected \[B, C, H, W\]"):
        ops.upsample_add(features, adapted[:1])
    with pytest.raises(ValueError, match=r"with B = 2 and C = 5"):
        ops.upsample_add(features, adapted[:, :4])
    with pytest.raises(TypeError, match="upsample_add: adapted must be float32, got float16"):
        ops.upsample_add(features, adapted.half())
    with pytest.raises(ValueError, match="its h and w must be at least 1"):
        ops.upsample_add(features[..., :0], adapted)


def test_kernel_compiles_for_sm90(device):
    variants = []
    for dtype in ("fp32", "fp16", "bf16"):
        signature = {"features_ptr": f"*{dtype}", "adapted_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
        for name in ("queries", "channels", "h", "w", "H", "W", "pixels"):
            signature[name] = "i32"
        for name in ("f_stride_b", "f_stride_q", "f_stride_c", "f_stride_h", "f_stride_w"):
            signature[name] = "i64"
        for name in ("a_stride_b", "a_stride_c", "a_stride_h", "a_stride_w"):
            signature[name] = "i64"
        signature.update(BLOCK_P="constexpr", BLOCK_C="constexpr")
        constexprs = {"BLOCK_P": upsample_add_kernels.BLOCK_P, "BLOCK_C": upsample_add_kernels.BLOCK_C}
        variants.append(("_upsample_add_kernel", signature, constexprs, upsample_add_kernels.WARPS))
    compile_for_sm90(device, "detr_fast.kernels.upsample_add", variants)
