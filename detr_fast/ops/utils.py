"""What the ops share: argument checks, and the casts of the kernel paths.

The checks raise errors that name the op, the argument, what it got and what was expected. They read only shapes,
dtypes and devices (metadata), never values, so they cost no host sync.
"""

from collections.abc import Sequence

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int64, torch.int32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels compute in


def check_tensor(
    op: str,
    name: str,
    tensor: object,
    ndim: int | None = None,
    min_ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise a TypeError/ValueError naming `op` and `name` unless `tensor` is a tensor of the expected kind."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dims, got shape {tuple(tensor.shape)}")
    if min_ndim is not None and tensor.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dims, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        expected = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must be {expected}, got {dtype_name(tensor.dtype)}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{op}: {name} is on {tensor.device} but the other inputs are on {device}")
    return tensor


def check_dim(op: str, name: str, tensor: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """Raise a ValueError unless tensor.shape[dim] == expected (`what` says where `expected` comes from)."""
    if tensor.shape[dim] != expected:
        raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}; its dim {dim} must be {expected} ({what})")


def check_shape(op: str, name: str, tensor: torch.Tensor, expected: Sequence[int], what: str) -> None:
    """Raise a ValueError unless tensor.shape == expected."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected)} ({what})")


def dtype_name(dtype: torch.dtype) -> str:
    """float32, not torch.float32."""
    return str(dtype).replace("torch.", "")


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast the floating tensors to the autocast dtype when autocast is on for their device, as autocast casts
    the inputs of the reference's matmuls (F.linear, einsum); float64 is left alone, as autocast leaves it."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype in KERNEL_DTYPES else t for t in tensors)


def kernel_unsupported(dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot take a `dtype` input, or None when they can."""
    if dtype not in KERNEL_DTYPES:
        return f"the Triton kernel takes float32, float16 and bfloat16, not {dtype_name(dtype)}"
    return None
