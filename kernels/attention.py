"""Triton kernels of `attention`: flash-style masked softmax attention in the [B, L, H, D] projection layout.

Forward (one program per block of BLOCK_M queries of one (batch, head)): walk the keys in blocks of BLOCK_N with an
online softmax (running row max m and row sum l), so the L x S score matrix never exists in memory. Padding keys
get -inf before the row max; a query whose keys are all padding has l = 0 and is written as zeros, and its
log-sum-exp is stored as +inf so that the backward recomputes exp(s - lse) = 0 for it (never 0 * inf = NaN).

Backward, without atomics (deterministic): one kernel per query block computes delta = rowsum(dO * O) and dQ, then
one kernel per key block computes dK and dV; both recompute the probabilities from the saved log-sum-exp.

Dropout on the probabilities uses Philox (tl.rand) keyed by a seed tensor drawn from torch's generator plus the
(batch, head) index, with counter query * S + key, so the backward regenerates exactly the forward's mask.

Precision: every tl.dot accumulates in fp32. fp16/bf16 operands go to the tensor cores as they are (the
probabilities and dS are rounded to the input dtype before their matmuls, as in FlashAttention). fp32 operands use
input_precision="tf32x3" (each operand split into two TF32 parts, three tensor-core products: an error of a few fp32
roundings per product, the trade-off PyTorch's own fp32 SDPA makes on the GPU) unless TF32 is allowed for CUDA
matmuls (torch.backends.cuda.matmul.fp32_precision = "tf32", or the older allow_tf32 = True), then "tf32", as
PyTorch's fp32 matmuls then do. Plain "ieee" would leave the tensor cores idle (FMA loops, register spills).
Triton's interpreter computes every tl.dot exactly in fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..dispatch import triton_interpreted
from .utils import dot_precision, multiprocessors

LOG2E = math.log2(math.e)


@triton.jit
def _attention_forward_kernel(
    Q,
    K,
    V,
    KeyPadding,
    Seed,
    Out,
    Lse,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_pb,
    stride_ps,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_od,
    heads,
    q_len,
    kv_len,
    head_dim,
    qk_scale,
    dropout_p,
    HAS_PADDING: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # qk_scale = scale * log2(e): scores live in base 2 so the exponentials are exp2.
    block_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)  # batch * stride_b can pass 2**31
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    dim_ok = dims < head_dim

    q = tl.load(
        Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_ql + dims[None, :] * stride_qd,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    if HAS_DROPOUT:
        seed = tl.load(Seed) + batch * heads + head

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        key_ok = cols < kv_len
        if HAS_PADDING:
            padding = tl.load(KeyPadding + batch * stride_pb + cols * stride_ps, mask=key_ok, other=1)
            key_ok = key_ok & (padding == 0)
        kv_mask = (cols < kv_len)[:, None] & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)

        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # While a row has seen only padding its max is -inf; subtracting 0 instead keeps exp2(-inf - -inf) = NaN
        # out of p and of the rescale factor (both become exp2(-inf) = 0).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(scores - shift[:, None])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        if HAS_DROPOUT:
            # The softmax normalizer sums the probabilities before dropout; only the weights of v are dropped.
            keep = tl.rand(seed, rows[:, None] * kv_len + cols[None, :]) >= dropout_p
            p = tl.where(keep, p, 0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    empty = row_sum == 0.0  # every key is padding (or S = 0)
    norm = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, row_sum))
    if HAS_DROPOUT:
        norm = norm / (1.0 - dropout_p)
    out = acc * norm[:, None]
    tl.store(
        Out + batch * stride_ob + head * stride_oh + rows[:, None] * stride_ol + dims[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )
    # LSE of the scaled scores in base 2, like the scores (a natural-log round trip would add ~1e-6 relative error
    # to every probability the backward recomputes); +inf for an all-padding row makes those probabilities 0.
    lse = tl.where(empty, float("inf"), row_max + tl.log2(tl.where(empty, 1.0, row_sum)))
    tl.store(Lse + (batch * heads + head) * q_len + rows, lse, mask=row_ok)


@triton.jit
def _attention_backward_dq_kernel(
    Q,
    K,
    V,
    KeyPadding,
    Seed,
    Out,
    GradOut,
    Lse,
    Delta,
    GradQ,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_pb,
    stride_ps,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_od,
    stride_gb,
    stride_gl,
    stride_gh,
    stride_gd,
    stride_dqb,
    stride_dql,
    stride_dqh,
    stride_dqd,
    heads,
    q_len,
    kv_len,
    head_dim,
    scale,
    qk_scale,
    dropout_p,
    HAS_PADDING: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Also writes Delta = rowsum(dO * O), which the dK/dV kernel (launched after this one) reads.
    block_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)  # batch * stride_b can pass 2**31
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    tile_mask = row_ok[:, None] & (dims < head_dim)[None, :]

    q = tl.load(
        Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_ql + dims[None, :] * stride_qd,
        mask=tile_mask,
        other=0.0,
    )
    out = tl.load(
        Out + batch * stride_ob + head * stride_oh + rows[:, None] * stride_ol + dims[None, :] * stride_od,
        mask=tile_mask,
        other=0.0,
    )
    grad_out = tl.load(
        GradOut + batch * stride_gb + head * stride_gh + rows[:, None] * stride_gl + dims[None, :] * stride_gd,
        mask=tile_mask,
        other=0.0,
    )
    delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)  # [BLOCK_M]
    row_stats = (batch * heads + head) * q_len + rows
    tl.store(Delta + row_stats, delta, mask=row_ok)
    lse = tl.load(Lse + row_stats, mask=row_ok, other=float("inf"))  # base 2
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    if HAS_DROPOUT:
        seed = tl.load(Seed) + batch * heads + head
        keep_scale = 1.0 / (1.0 - dropout_p)

    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        key_ok = cols < kv_len
        kv_mask = key_ok[:, None] & (dims < head_dim)[None, :]
        if HAS_PADDING:
            padding = tl.load(KeyPadding + batch * stride_pb + cols * stride_ps, mask=key_ok, other=1)
            key_ok = key_ok & (padding == 0)
        k = tl.load(k_base + cols[:, None] * stride_ks + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)

        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(key_ok[None, :], tl.exp2(scores - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        grad_p = tl.dot(grad_out, tl.trans(v), input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = tl.rand(seed, rows[:, None] * kv_len + cols[None, :]) >= dropout_p
            grad_p = tl.where(keep, grad_p * keep_scale, 0.0)
        grad_scores = p * (grad_p - delta[:, None])
        grad_q += tl.dot(grad_scores.to(k.dtype), k, input_precision=PRECISION)

    grad_q = grad_q * scale
    tl.store(
        GradQ + batch * stride_dqb + head * stride_dqh + rows[:, None] * stride_dql + dims[None, :] * stride_dqd,
        grad_q.to(GradQ.dtype.element_ty),
        mask=tile_mask,
    )


@triton.jit
def _attention_backward_dkdv_kernel(
    Q,
    K,
    V,
    KeyPadding,
    Seed,
    GradOut,
    Lse,
    Delta,
    GradK,
    GradV,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_pb,
    stride_ps,
    stride_gb,
    stride_gl,
    stride_gh,
    stride_gd,
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dkd,
    stride_dvb,
    stride_dvs,
    stride_dvh,
    stride_dvd,
    heads,
    q_len,
    kv_len,
    head_dim,
    scale,
    qk_scale,
    dropout_p,
    HAS_PADDING: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Works on the transposed problem: rows are this program's keys, columns the queries.
    block_n = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)  # batch * stride_b can pass 2**31
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    key_in_range = cols < kv_len
    kv_mask = key_in_range[:, None] & dim_ok[None, :]
    key_ok = key_in_range
    if HAS_PADDING:
        padding = tl.load(KeyPadding + batch * stride_pb + cols * stride_ps, mask=key_in_range, other=1)
        key_ok = key_ok & (padding == 0)
    k = tl.load(
        K + batch * stride_kb + head * stride_kh + cols[:, None] * stride_ks + dims[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    v = tl.load(
        V + batch * stride_vb + head * stride_vh + cols[:, None] * stride_vs + dims[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    q_base = Q + batch * stride_qb + head * stride_qh
    g_base = GradOut + batch * stride_gb + head * stride_gh
    stats_base = (batch * heads + head) * q_len
    if HAS_DROPOUT:
        seed = tl.load(Seed) + batch * heads + head
        keep_scale = 1.0 / (1.0 - dropout_p)

    grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, q_len, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        tile_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_ql + dims[None, :] * stride_qd, mask=tile_mask, other=0.0)
        grad_out = tl.load(g_base + rows[:, None] * stride_gl + dims[None, :] * stride_gd, mask=tile_mask, other=0.0)
        # Rows past q_len load lse = +inf, so their probabilities are exactly 0.
        lse = tl.load(Lse + stats_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + stats_base + rows, mask=row_ok, other=0.0)

        scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.where(key_ok[:, None], tl.exp2(scores_t - lse[None, :]), 0.0)
        grad_p_t = tl.dot(v, tl.trans(grad_out), input_precision=PRECISION)
        if HAS_DROPOUT:
            keep_t = tl.rand(seed, rows[None, :] * kv_len + cols[:, None]) >= dropout_p
            dropped_p_t = tl.where(keep_t, p_t * keep_scale, 0.0)
            grad_p_t = tl.where(keep_t, grad_p_t * keep_scale, 0.0)
        else:
            dropped_p_t = p_t
        grad_v += tl.dot(dropped_p_t.to(grad_out.dtype), grad_out, input_precision=PRECISION)
        grad_scores_t = p_t * (grad_p_t - delta[None, :])
        grad_k += tl.dot(grad_scores_t.to(q.dtype), q, input_precision=PRECISION)

    grad_k = grad_k * scale
    tl.store(
        GradK + batch * stride_dkb + head * stride_dkh + cols[:, None] * stride_dks + dims[None, :] * stride_dkd,
        grad_k.to(GradK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        GradV + batch * stride_dvb + head * stride_dvh + cols[:, None] * stride_dvs + dims[None, :] * stride_dvd,
        grad_v.to(GradV.dtype.element_ty),
        mask=kv_mask,
    )


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _forward_config(q: torch.Tensor) -> dict:
    """Block sizes and launch options of the forward: a fixed heuristic (no autotuning, so the choice is
    deterministic and needs no benchmarking under the interpreter)."""
    if triton_interpreted():
        # The interpreter's cost is per program and loop step, so blocks as large as the tests' small odd shapes
        # allow while they still span several blocks with a ragged tail (S = 77 -> 32 + 32 + 13).
        return dict(BLOCK_M=32, BLOCK_N=32)
    batch, q_len, heads, head_dim = q.shape
    # Blocks and warps for which ptxas (sm_90a) spills no register with triton 3.6 and 3.8, or a few bytes (fp32 at
    # D = 128: 16-32 bytes): fp32 operands go to the tensor cores split in two (3xTF32), which costs registers.
    if q.dtype == torch.float32:
        if head_dim <= 64:
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)
    block_m = 128
    if triton.cdiv(q_len, block_m) * batch * heads < multiprocessors(q.device.index or 0):
        block_m = 64  # too few programs to fill the GPU with 128-query blocks (the decoder's 100 queries)
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4 if head_dim <= 64 else 8, num_stages=3)


def _backward_config(q: torch.Tensor) -> dict:
    """Block sizes of both backward kernels (queries x keys per tile)."""
    if triton_interpreted():
        return dict(BLOCK_M=32, BLOCK_N=32)
    head_dim = q.shape[-1]
    # No register spills with triton 3.6 or 3.8 on sm_90a for D = 32, 64, 128 (see _forward_config).
    if q.dtype == torch.float32:
        if head_dim <= 64:
            return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)  # 64 x 64 spills registers at D = 128


def _padding_args(key_padding_mask: torch.Tensor | None, like: torch.Tensor) -> tuple:
    """(pointer tensor, stride_b, stride_s) for the mask; a 1-element dummy when there is none."""
    if key_padding_mask is None:
        return like, 0, 0
    mask = key_padding_mask.view(torch.uint8)  # bool -> bytes: same storage, portable across Triton versions
    return mask, mask.stride(0), mask.stride(1)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        q: [B, L, H, D]; k, v: [B, S, H, D] (any strides); key_padding_mask: [B, S] bool or None.
        seed: int64 [1] Philox key when dropout_p > 0, else None.
    Returns:
        out [B, L, H, D] (contiguous, q's dtype), lse [B, H, L] float32: the log-sum-exp of the scores in base 2
        (the kernels' working base), +inf for all-padding rows.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads, q_len, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    config = _forward_config(q)
    padding, stride_pb, stride_ps = _padding_args(key_padding_mask, q)
    grid = (triton.cdiv(q_len, config["BLOCK_M"]), heads, batch)
    _attention_forward_kernel[grid](
        q,
        k,
        v,
        padding,
        q if seed is None else seed,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        stride_pb,
        stride_ps,
        *out.stride(),
        heads,
        q_len,
        kv_len,
        head_dim,
        scale * LOG2E,
        dropout_p,
        HAS_PADDING=key_padding_mask is not None,
        HAS_DROPOUT=dropout_p > 0,
        PRECISION=dot_precision(q.dtype),
        BLOCK_D=_block_d(head_dim),
        **config,
    )
    return out, lse


def attention_backward(
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
    """Launch the dQ kernel, then the dK/dV kernel.

    Args:
        grad_out, out: [B, L, H, D]; q: [B, L, H, D]; k, v: [B, S, H, D]; lse: [B, H, L] from attention_forward;
        key_padding_mask, seed, dropout_p, scale: as given to attention_forward.
    Returns:
        (grad_q [B, L, H, D], grad_k [B, S, H, D], grad_v [B, S, H, D]), contiguous, in q's dtype.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
    grad_k = torch.empty_like(k, memory_format=torch.contiguous_format)
    grad_v = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q_len == 0 or kv_len == 0 or batch * heads == 0:
        return grad_q.zero_(), grad_k.zero_(), grad_v.zero_()
    delta = torch.empty_like(lse)
    config = _backward_config(q)
    padding, stride_pb, stride_ps = _padding_args(key_padding_mask, q)
    seed_arg = q if seed is None else seed
    flags = dict(
        HAS_PADDING=key_padding_mask is not None,
        HAS_DROPOUT=dropout_p > 0,
        PRECISION=dot_precision(q.dtype),
        BLOCK_D=_block_d(head_dim),
        **config,
    )
    _attention_backward_dq_kernel[(triton.cdiv(q_len, config["BLOCK_M"]), heads, batch)](
        q,
        k,
        v,
        padding,
        seed_arg,
        out,
        grad_out,
        lse,
        delta,
        grad_q,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        stride_pb,
        stride_ps,
        *out.stride(),
        *grad_out.stride(),
        *grad_q.stride(),
        heads,
        q_len,
        kv_len,
        head_dim,
        scale,
        scale * LOG2E,
        dropout_p,
        **flags,
    )
    _attention_backward_dkdv_kernel[(triton.cdiv(kv_len, config["BLOCK_N"]), heads, batch)](
        q,
        k,
        v,
        padding,
        seed_arg,
        grad_out,
        lse,
        delta,
        grad_k,
        grad_v,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        stride_pb,
        stride_ps,
        *grad_out.stride(),
        *grad_k.stride(),
        *grad_v.stride(),
        heads,
        q_len,
        kv_len,
        head_dim,
        scale,
        scale * LOG2E,
        dropout_p,
        **flags,
    )
    return grad_q, grad_k, grad_v
