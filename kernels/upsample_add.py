"""Triton kernel of `upsample_add`: the nearest upsample of per-query maps plus the broadcast add of their image's
features, in one pass that writes the [B, Q, C, H, W] result once (PyTorch writes the upsampled maps, then reads
them back to add).

Launch layout: programs over (blocks of BLOCK_P output pixels of the B*Q*H*W, blocks of BLOCK_C channels); the
output is channels-last per map (memory order b, q, y, x, c), so that each program writes BLOCK_P runs of BLOCK_C
contiguous values, and the 3x3 convolution that follows reads it in the layout it prefers. Source rows and columns
follow PyTorch's "nearest" (floor(dst * (in / out)) in float32, at most in - 1), so every value is the reference's
bit for bit: one rounding of a float32 sum.
"""

import torch
import triton
import triton.language as tl

from ..reference.upsample_add import upsample_add_strides

BLOCK_P, BLOCK_C, WARPS = 64, 32, 4


@triton.jit
def _nearest_source(dst, in_size, out_size):
    """PyTorch's nearest source index (upsample_nearest2d): min(floor(dst * (in / out)), in - 1), in float32."""
    scale = in_size.to(tl.float32) / out_size.to(tl.float32)
    src = tl.floor(dst.to(tl.float32) * scale).to(tl.int32)
    return tl.minimum(src, in_size - 1)


@triton.jit
def _upsample_add_kernel(
    features_ptr, adapted_ptr, out_ptr,
    queries, channels, h, w, H, W, pixels,
    f_stride_b, f_stride_q, f_stride_c, f_stride_h, f_stride_w,
    a_stride_b, a_stride_c, a_stride_h, a_stride_w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pixel = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat (b q, y, x)
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = (pixel < pixels)[:, None] & (channel < channels)[None, :]
    x = pixel % W
    y = (pixel // W) % H
    map_index = pixel // (H * W)  # b * Q + q
    image = map_index // queries
    query = map_index % queries
    src_y = _nearest_source(y, h, H)
    src_x = _nearest_source(x, w, W)
    feature_offset = image * f_stride_b + query * f_stride_q + src_y * f_stride_h + src_x * f_stride_w
    feature = tl.load(features_ptr + feature_offset[:, None] + channel[None, :] * f_stride_c, mask=valid, other=0.0)
    adapted_offset = image * a_stride_b + y * a_stride_h + x * a_stride_w
    adapted = tl.load(adapted_ptr + adapted_offset[:, None] + channel[None, :] * a_stride_c, mask=valid, other=0.0)
    total = feature.to(tl.float32) + adapted.to(tl.float32)
    tl.store(out_ptr + pixel[:, None] * channels + channel[None, :], total.to(out_ptr.dtype.element_ty), mask=valid)


def upsample_add_forward(features: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
    """Launch the kernel: features [B, Q, C, h, w] and adapted [B, C, H, W] (any strides, one dtype) ->
    [B, Q, C, H, W] channels-last per map."""
    batch, queries, channels, h, w = features.shape
    height, width = adapted.shape[-2:]
    shape = (batch, queries, channels, height, width)
    out = torch.empty_strided(shape, upsample_add_strides(shape), dtype=features.dtype, device=features.device)
    pixels = batch * queries * height * width
    if pixels * channels > 0:
        grid = (triton.cdiv(pixels, BLOCK_P), triton.cdiv(channels, BLOCK_C))
        _upsample_add_kernel[grid](
            features, adapted, out, queries, channels, h, w, height, width, pixels,
            *features.stride(), *adapted.stride(), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=WARPS,
        )  # fmt: skip
    return out
