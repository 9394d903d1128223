"""`attention`: multi-head attention with a key-padding mask, in the (B, L, H, D) layout of the projections.

Three layers (as in Liger-Kernel): the Triton kernels in detr_fast.kernels.attention; the torch.library ops
`detr_fast::attention` / `detr_fast::attention_backward` (handles `attention_kernel`, `attention_backward_kernel`)
with their fake (meta) functions and autograd formula, so torch.compile(fullgraph=True) traces them as single nodes;
and the public `attention` below, which validates, picks the kernel or the reference (detr_fast.dispatch.use_triton)
and applies autocast.

The ops are torch.library.custom_op rather than triton_op: triton_op decomposes into its body while tracing, and
under TRITON_INTERPRET=1 (how CI runs the kernels on CPU tensors) wrap_triton hands back the interpreter, which
then runs on fake tensors and fails; a custom op traces the same way on both devices. The kernels are already
fused, so inductor has nothing to gain from seeing inside them.
"""

import torch

from .. import reference
from ..dispatch import fall_back, kernel_device, use_triton
from .utils import FLOATS, autocast_inputs, check_dim, check_shape, check_tensor, kernel_unsupported

OP = "detr_fast.attention"
MAX_KERNEL_HEAD_DIM = 128


def check_attention_args(q, k, v, key_padding_mask, dropout_p, scale) -> None:
    """Validate the arguments of `attention` (metadata only, no host sync)."""
    check_tensor(OP, "q", q, ndim=4, dtypes=FLOATS)
    check_tensor(OP, "k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor(OP, "v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    batch, _, heads, head_dim = q.shape
    check_shape(OP, "k", k, (batch, k.shape[1], heads, head_dim), "k must be [B, S, H, D] with q's B, H, D")
    check_shape(OP, "v", v, k.shape, "v must have k's shape [B, S, H, D]")
    if key_padding_mask is not None:
        check_tensor(OP, "key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,), device=q.device)
        check_shape(OP, "key_padding_mask", key_padding_mask, (batch, k.shape[1]), "[B, S], True = padding")
    check_dim(OP, "q", q, 0, k.shape[0], "q and k share the batch size")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not scale > 0:
        raise ValueError(f"{OP}: scale must be positive or None, got {scale}")


@torch.library.custom_op("detr_fast::attention", mutates_args=())
def attention_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel forward: q [B, L, H, D], k/v [B, S, H, D], key_padding_mask [B, S] bool or None, seed int64 [1]
    (Philox key, needed when dropout_p > 0) -> (out [B, L, H, D] contiguous, lse [B, H, L] float32)."""
    if dropout_p > 0 and seed is None:
        raise ValueError("detr_fast::attention: dropout_p > 0 needs a seed tensor (int64, [1])")
    with kernel_device("detr_fast::attention", q):
        from ..kernels import attention as attention_kernels

        return attention_kernels.attention_forward(q, k, v, key_padding_mask, seed, dropout_p, scale)


@attention_kernel.register_fake
def _attention_fake(q, k, v, key_padding_mask, seed, dropout_p, scale):
    batch, q_len, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((batch, heads, q_len), dtype=torch.float32)


@torch.library.custom_op("detr_fast::attention_backward", mutates_args=())
def attention_backward_kernel(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel backward: the gradients (dq [B, L, H, D], dk, dv [B, S, H, D]) from grad_out [B, L, H, D] and the
    forward's inputs, out and lse."""
    with kernel_device("detr_fast::attention_backward", q):
        from ..kernels import attention as attention_kernels

        return attention_kernels.attention_backward(
            grad_out, q, k, v, out, lse, key_padding_mask, seed, dropout_p, scale
        )


@attention_backward_kernel.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, key_padding_mask, seed, dropout_p, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, seed, dropout_p, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
    ctx.dropout_p = dropout_p
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
    grad_q, grad_k, grad_v = attention_backward_kernel(
        grad_out, q, k, v, out, lse, key_padding_mask, seed, ctx.dropout_p, ctx.scale
    )
    return grad_q, grad_k, grad_v, None, None, None, None


attention_kernel.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the keys that are not padding.

    Args:
        q: [B, L, H, D]; k, v: [B, S, H, D] (any strides: the views the projections produce).
        key_padding_mask: [B, S] bool, True = padding.
        dropout_p: dropout on the attention probabilities (pass 0.0 in eval). The kernel draws its Philox seed
            from torch's generator on q's device, so torch.manual_seed makes it reproducible.
        scale: defaults to D ** -0.5.
    Returns:
        [B, L, H, D]; a query whose keys are all padding returns zeros.
    """
    check_attention_args(q, k, v, key_padding_mask, dropout_p, scale)
    if not use_triton(OP, q.device):
        return reference.attention(q, k, v, key_padding_mask, dropout_p, scale)
    q, k, v = autocast_inputs(q, k, v)
    batch, q_len, heads, head_dim = q.shape
    reason = kernel_unsupported(q.dtype)
    if reason is None and head_dim > MAX_KERNEL_HEAD_DIM:
        reason = f"the Triton kernel takes head dims up to {MAX_KERNEL_HEAD_DIM}, got D={head_dim}"
    if reason is None and dropout_p > 0 and q_len * k.shape[1] >= 2**31:
        reason = f"in-kernel dropout numbers L*S < 2**31 elements per head, got L={q_len}, S={k.shape[1]}"
    if reason is not None:
        fall_back(OP, reason)
        return reference.attention(q, k, v, key_padding_mask, dropout_p, scale)
    scale = head_dim**-0.5 if scale is None else float(scale)
    seed = None
    if dropout_p > 0:
        # A tensor draw from the device's generator: no host sync, and reproducible under torch.manual_seed.
        seed = torch.randint(0, 2**62, (1,), device=q.device, dtype=torch.int64)
    out, _ = attention_kernel(q, k, v, key_padding_mask, seed, float(dropout_p), scale)
    return out
