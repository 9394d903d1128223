"""`qkv_projection`: attention input projections where some output rows read (x + pos) and the rest read x.

Three layers: the Triton kernel in detr_fast.kernels.qkv_projection (forward: one GEMM that adds pos in registers);
the torch.library op `detr_fast::qkv_projection` (handle `qkv_projection_kernel`) with its fake function and
autograd formula (the backward is cuBLAS matmuls, see `_backward`); the public `qkv_projection` below (validation,
kernel/reference dispatch, autocast). custom_op rather than triton_op for the reason given in detr_fast.ops.attention.
"""

import torch

from .. import reference
from ..dispatch import fall_back, kernel_device, use_triton
from .utils import FLOATS, autocast_inputs, check_shape, check_tensor, dtype_name, kernel_unsupported

OP = "detr_fast.qkv_projection"


@torch.library.custom_op("detr_fast::qkv_projection", mutates_args=())
def qkv_projection_kernel(
    x: torch.Tensor, pos: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, pos_rows: int
) -> torch.Tensor:
    """Kernel forward: x, pos [..., C] (pos may be None), weight [R, C], bias [R] or None, one dtype -> [..., R]."""
    with kernel_device("detr_fast::qkv_projection", x):
        from ..kernels.qkv_projection import qkv_projection_forward  # imports triton: only on the kernel path

        return qkv_projection_forward(x, pos, weight, bias, pos_rows)


@qkv_projection_kernel.register_fake
def _qkv_projection_fake(x, pos, weight, bias, pos_rows):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, pos, weight, bias, pos_rows = inputs
    ctx.save_for_backward(x, pos, weight)
    ctx.pos_rows = pos_rows if pos is not None else 0
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    # Three GEMMs on the saved x, pos and weight (g = grad_out as [M, R], P = pos_rows):
    #   grad_pos = g[:, :P] @ W[:P];  grad_x = grad_pos + g[:, P:] @ W[P:]  (one addmm: no extra FLOPs over g @ W)
    #   grad_W = g^T @ x, then grad_W[:P] += g[:, :P]^T @ pos               (= g[:, :P]^T @ (x + pos))
    # These are plain GEMMs that cuBLAS runs at peak, and x + pos is never formed here either.
    x, pos, weight = ctx.saved_tensors
    rows = ctx.pos_rows
    channels = weight.shape[1]
    grad = grad_out.reshape(-1, weight.shape[0])  # [M, R]
    x2 = x.reshape(-1, channels)  # [M, C]
    need_x, need_pos, need_weight, need_bias = ctx.needs_input_grad[:4]
    grad_x = grad_pos = grad_weight = grad_bias = None
    if rows > 0 and (need_pos or need_x):
        grad_pos = grad[:, :rows] @ weight[:rows]  # [M, C]
        if need_x:
            grad_x = grad_pos if rows == weight.shape[0] else torch.addmm(grad_pos, grad[:, rows:], weight[rows:])
    elif need_x:
        grad_x = grad @ weight
    if need_weight:
        grad_weight = grad.T @ x2  # [R, C]
        if rows > 0:
            grad_weight[:rows].addmm_(grad[:, :rows].T, pos.reshape(-1, channels))
    if need_bias and ctx.has_bias:
        grad_bias = grad.sum(0)
    grad_x = None if grad_x is None else grad_x.view(x.shape)
    grad_pos = None if grad_pos is None or not need_pos else grad_pos.view(pos.shape)
    return grad_x, grad_pos, grad_weight, grad_bias, None


qkv_projection_kernel.register_autograd(_backward, setup_context=_setup_context)


def qkv_projection(
    x: torch.Tensor, pos: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, pos_rows: int
) -> torch.Tensor:
    """out[..., :pos_rows] = (x + pos) @ weight[:pos_rows].T + bias[:pos_rows]; out[..., pos_rows:] reads x alone.

    Args:
        x: [..., C]; pos: [..., C] or None.
        weight: [R, C] (e.g. [Wq; Wk; Wv] with pos_rows = 2C); bias: [R] or None; pos_rows in [0, R].
    Returns:
        [..., R].
    """
    check_tensor(OP, "x", x, min_ndim=1, dtypes=FLOATS)
    check_tensor(OP, "weight", weight, ndim=2, dtypes=FLOATS, device=x.device)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{OP}: weight has shape {tuple(weight.shape)}; expected [R, {x.shape[-1]}] for x {tuple(x.shape)}"
        )
    if pos is not None:
        check_tensor(OP, "pos", pos, dtypes=FLOATS, device=x.device)
        check_shape(OP, "pos", pos, x.shape, "pos must have x's shape")
    if bias is not None:
        check_tensor(OP, "bias", bias, ndim=1, dtypes=FLOATS, device=x.device)
        check_shape(OP, "bias", bias, (weight.shape[0],), "one bias per output row")
    if not 0 <= pos_rows <= weight.shape[0]:
        raise ValueError(f"{OP}: pos_rows must be in [0, {weight.shape[0]}], got {pos_rows}")
    if not use_triton(OP, x.device):
        return reference.qkv_projection(x, pos, weight, bias, pos_rows)
    x, pos, weight, bias = autocast_inputs(x, pos, weight, bias)
    for name, tensor in (("pos", pos), ("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != x.dtype:
            raise TypeError(
                f"{OP}: {name} is {dtype_name(tensor.dtype)} but x is {dtype_name(x.dtype)}; the inputs must share "
                "one dtype (or run under autocast)"
            )
    reason = kernel_unsupported(x.dtype)
    if reason is not None:
        fall_back(OP, reason)
        return reference.qkv_projection(x, pos, weight, bias, pos_rows)
    return qkv_projection_kernel(x, pos, weight, bias, pos_rows)
