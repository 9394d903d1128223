"""`upsample_add`: a fusion stage of the mask head, the nearest upsample of per-query maps plus the broadcast add of
their image's adapted FPN features, [B, Q, C, h, w] + [B, C, H, W] -> [B, Q, C, H, W] (channels-last per map).

Three paths with one contract, chosen by detr_fast.dispatch.triton_or_cpu_path: the Triton kernel
(kernels/upsample_add.py, one pass that writes the result once) behind the torch.library op detr_fast::upsample_add
(CUDA tensors); on the CPU, detr_fast::upsample_add_cpu, the reference's forward (PyTorch's upsample, then the add in
place) with the same hand-written backward; the reference with autograd (backend "reference"). The backward needs
none of the inputs' values: the features' gradient is the nearest upsample's backward (each source pixel sums the
output pixels it was copied to), the adapted features' the sum over the queries, read in the gradient's memory
order (autograd's sum over a broadcast dimension is 5-15x slower on the channels-last gradient on the CPU).
"""

import torch

from .. import reference
from ..dispatch import kernel_device, triton_or_cpu_path
from .utils import FLOATS, check_tensor

OP = "detr_fast.upsample_add"


@torch.library.custom_op("detr_fast::upsample_add", mutates_args=())
def upsample_add_kernel(features: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
    """The Triton forward: [B, Q, C, H, W] (channels-last per map) from features [B, Q, C, h, w], adapted
    [B, C, H, W]."""
    with kernel_device("detr_fast::upsample_add", features):
        from ..kernels.upsample_add import upsample_add_forward  # imports triton: only on the kernel path

        return upsample_add_forward(features, adapted)


@torch.library.custom_op("detr_fast::upsample_add_cpu", mutates_args=())
def upsample_add_cpu(features: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
    """The CPU path's forward: the reference's, with the adapted features made channels last too (the in-place add
    then reads both in one order, about 3x faster)."""
    return reference.upsample_add(features, adapted.contiguous(memory_format=torch.channels_last))


def _output_like(features, adapted):
    shape = (*features.shape[:3], *adapted.shape[-2:])
    return features.new_empty_strided(shape, reference.upsample_add_strides(shape))


upsample_add_kernel.register_fake(_output_like)
upsample_add_cpu.register_fake(_output_like)


def _setup_context(ctx, inputs, output):
    features, adapted = inputs
    ctx.features_shape = features.shape
    ctx.needs = ctx.needs_input_grad


def _sum_over_queries(grad: torch.Tensor) -> torch.Tensor:
    """grad [B, Q, C, H, W] summed over Q, reading it in memory order: [B, C, H, W]."""
    if grad.stride(2) == 1:  # channels last per map
        return grad.permute(0, 1, 3, 4, 2).sum(1).permute(0, 3, 1, 2)
    return grad.sum(1)


def _backward(ctx, grad):
    """(d features [B, Q, C, h, w], d adapted [B, C, H, W]) from grad [B, Q, C, H, W]."""
    batch, queries, channels, height, width = ctx.features_shape
    grad_features = grad_adapted = None
    if ctx.needs[0]:
        grad_features = torch.ops.aten.upsample_nearest2d_backward(
            grad.flatten(0, 1), grad.shape[-2:], [batch * queries, channels, height, width]
        ).unflatten(0, (batch, queries))
    if ctx.needs[1]:
        grad_adapted = _sum_over_queries(grad)
    return grad_features, grad_adapted


upsample_add_kernel.register_autograd(_backward, setup_context=_setup_context)
upsample_add_cpu.register_autograd(_backward, setup_context=_setup_context)


def check_upsample_add_args(features, adapted) -> None:
    """Validate the arguments of `upsample_add` (metadata only, no host sync)."""
    check_tensor(OP, "features", features, ndim=5, dtypes=FLOATS)
    check_tensor(OP, "adapted", adapted, ndim=4, dtypes=(features.dtype,), device=features.device)
    if adapted.shape[0] != features.shape[0] or adapted.shape[1] != features.shape[2]:
        raise ValueError(
            f"{OP}: adapted has shape {tuple(adapted.shape)}, expected [B, C, H, W] with B = {features.shape[0]} "
            f"and C = {features.shape[2]} (features [B, Q, C, h, w] = {tuple(features.shape)})"
        )
    if 0 in features.shape[-2:]:
        raise ValueError(f"{OP}: features has shape {tuple(features.shape)}; its h and w must be at least 1")


def upsample_add(features: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
    """Nearest-upsample every query's map to the FPN level's size and add its image's features (see
    detr_fast.reference.upsample_add).

    Args:
        features: [B, Q, C, h, w]; adapted: [B, C, H, W], the same dtype.
    Returns:
        [B, Q, C, H, W] in that dtype, channels-last per map; differentiable in both inputs.
    """
    check_upsample_add_args(features, adapted)
    path = triton_or_cpu_path(OP, features.device)
    if path == "triton":
        return upsample_add_kernel(features, adapted)
    if path == "cpu":
        return upsample_add_cpu(features, adapted)
    return reference.upsample_add(features, adapted)
