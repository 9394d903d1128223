"""Launch helpers the Triton kernels share: the matmul input precision, the compute dtype, device properties."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def tf32_allowed() -> bool:
    """Whether PyTorch may use TF32 for fp32 CUDA matmuls. Reads the fp32_precision API where torch has it
    (>= 2.9): reading the older allow_tf32 there raises once the new API has been used (transformers does)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is None:
        return torch.backends.cuda.matmul.allow_tf32
    return precision == "tf32"  # "none" (never set) means IEEE, the default


def dot_precision(dtype: torch.dtype) -> str:
    """The tl.dot input_precision for operands of `dtype`: fp32 operands as 3xTF32 ("tf32x3", about fp32 accuracy
    on the tensor cores) unless PyTorch allows TF32 for fp32 matmuls, then "tf32" as PyTorch's own matmuls. 16-bit
    operands get Triton's default, "tf32", which they ignore."""
    if dtype == torch.float32 and not tf32_allowed():
        return "tf32x3"
    return "tf32"


@functools.cache
def multiprocessors(device_index: int) -> int:
    """The number of streaming multiprocessors of CUDA device `device_index` (cached: the query is slow)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss and cost kernels compute and return in: float64 for float64 inputs, else float32."""
    return torch.promote_types(dtype, torch.float32)


@triton.jit
def to_compute(x, FP64: tl.constexpr):
    """Convert loaded values to the compute dtype: float64 for float64 inputs, else float32."""
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def scalar_to_compute(value, FP64: tl.constexpr):
    """A float kernel argument (annotated tl.float64) in the compute dtype. tl.full, not .to: the interpreter passes
    the argument as a Python float, which it would otherwise round to fp32."""
    if FP64:
        return tl.full((), value, tl.float64)
    else:
        return tl.full((), value, tl.float32)
