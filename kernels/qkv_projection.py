"""Triton kernel of `qkv_projection`: out[:, :P] = (x + pos) @ W[:P]^T, out[:, P:] = x @ W[P:]^T, plus bias.

One GEMM over output tiles [BLOCK_M rows, BLOCK_N output features]. A tile whose features all read x + pos adds
pos to x in registers before the tile's tl.dot, so x + pos is never written to memory; a tile that straddles the
boundary P computes x @ W^T + pos @ W[:P]^T; the other tiles read x alone. Programs are numbered feature tile
first, so the programs that share one block of rows of x and pos run side by side and read it from DRAM once
(later reads hit L2).

x and pos are read through [B, T, C] strides, so the encoder's transposed feature map [B, S, C] (a view of
[B, C, S]) needs no copy. Accumulation is fp32; fp32 operands use the input precision of
kernels.utils.dot_precision (3xTF32 unless TF32 is allowed for CUDA matmuls, then TF32).

The backward is not a kernel: it is three cuBLAS matmuls (see detr_fast.ops.qkv_projection), which is already as
fast as the hardware allows for these plain GEMM shapes and never forms x + pos either.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import triton_interpreted
from .utils import dot_precision


@triton.jit
def _qkv_projection_kernel(
    X,
    Pos,
    W,
    Bias,
    Out,
    stride_xb,
    stride_xt,
    stride_xc,
    stride_pb,
    stride_pt,
    stride_pc,
    stride_wr,
    stride_wc,
    stride_om,
    stride_or,
    num_rows,
    seq_len,
    channels,
    out_features,
    pos_rows,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    feature_tiles = tl.cdiv(out_features, BLOCK_N)
    tile_m = pid // feature_tiles
    tile_n = pid % feature_tiles
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flat row index over [B, T]
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    row_ok = rows < num_rows
    col_ok = cols < out_features
    rows_b = (rows // seq_len).to(tl.int64)
    rows_t = (rows % seq_len).to(tl.int64)  # a 2-D x is one "image" of all rows: T * C may pass 2**31
    x_rows = X + rows_b * stride_xb + rows_t * stride_xt
    pos_rows_ptr = Pos + rows_b * stride_pb + rows_t * stride_pt
    w_rows = W + cols * stride_wr
    first_col = tile_n * BLOCK_N

    # Without pos the launcher passes pos_rows = 0, so every tile takes the last branch.
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if first_col + BLOCK_N <= pos_rows:
        # Every feature of the tile reads x + pos: add in registers (fp32, rounded to the input dtype as the
        # reference's x + pos is), one dot per channel block.
        for k0 in range(0, channels, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < channels
            a_mask = row_ok[:, None] & k_ok[None, :]
            x = tl.load(x_rows[:, None] + ks[None, :] * stride_xc, mask=a_mask, other=0.0)
            pos = tl.load(pos_rows_ptr[:, None] + ks[None, :] * stride_pc, mask=a_mask, other=0.0)
            a = (x.to(tl.float32) + pos.to(tl.float32)).to(x.dtype)
            w = tl.load(w_rows[:, None] + ks[None, :] * stride_wc, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(a, tl.trans(w), input_precision=PRECISION)
    elif first_col < pos_rows:
        # The tile straddles pos_rows: x @ W^T over all its features plus pos @ W^T over those below pos_rows.
        w_pos_ok = col_ok & (cols < pos_rows)
        for k0 in range(0, channels, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < channels
            a_mask = row_ok[:, None] & k_ok[None, :]
            x = tl.load(x_rows[:, None] + ks[None, :] * stride_xc, mask=a_mask, other=0.0)
            pos = tl.load(pos_rows_ptr[:, None] + ks[None, :] * stride_pc, mask=a_mask, other=0.0)
            w = tl.load(w_rows[:, None] + ks[None, :] * stride_wc, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            w_pos = tl.where(w_pos_ok[:, None], w, 0.0).to(w.dtype)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
            acc += tl.dot(pos, tl.trans(w_pos), input_precision=PRECISION)
    else:
        for k0 in range(0, channels, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < channels
            x = tl.load(x_rows[:, None] + ks[None, :] * stride_xc, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows[:, None] + ks[None, :] * stride_wc, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        Out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_or,
        acc.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _config(x: torch.Tensor) -> dict:
    """Tile sizes: a fixed heuristic per dtype (deterministic, no autotuning)."""
    if triton_interpreted():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)  # the interpreter's cost is per program: few, large tiles
    # The largest tiles for which ptxas (sm_90, triton 3.8) reports no register spills.
    if x.dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., T, C] -> a [B, T, C] view (a copy only when the leading dims do not flatten into one stride)."""
    if t.dim() == 1:
        return t[None, None]
    if t.dim() == 2:
        return t[None]
    return t.reshape(-1, *t.shape[-2:])


def qkv_projection_forward(
    x: torch.Tensor, pos: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, pos_rows: int
) -> torch.Tensor:
    """Launch the projection kernel.

    Args:
        x: [..., C]; pos: [..., C] or None; weight: [R, C]; bias: [R] or None; pos_rows in [0, R]; one dtype.
    Returns:
        [..., R], contiguous.
    """
    out_features, channels = weight.shape
    x3 = as_rows(x)  # [B, T, C]
    batch, seq_len, _ = x3.shape
    num_rows = batch * seq_len
    out = torch.empty(num_rows, out_features, device=x.device, dtype=x.dtype)  # [B*T, R]
    if num_rows == 0 or out_features == 0:
        return out.view(*x.shape[:-1], out_features)
    has_pos = pos is not None and pos_rows > 0
    pos3 = as_rows(pos) if has_pos else x3
    config = _config(x)
    grid = (triton.cdiv(num_rows, config["BLOCK_M"]) * triton.cdiv(out_features, config["BLOCK_N"]),)
    _qkv_projection_kernel[grid](
        x3,
        pos3,
        weight,
        x if bias is None else bias,
        out,
        *x3.stride(),
        *pos3.stride(),
        *weight.stride(),
        *out.stride(),
        num_rows,
        seq_len,
        channels,
        out_features,
        pos_rows if has_pos else 0,
        HAS_BIAS=bias is not None,
        PRECISION=dot_precision(x.dtype),
        **config,
    )
    return out.view(*x.shape[:-1], out_features)
