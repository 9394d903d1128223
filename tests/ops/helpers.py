"""Shared pieces of the kernel tests: the dtype -> tolerance table, flash-attention's low-precision criterion and
the skips for what Triton's CPU interpreter cannot run."""

import pytest
import torch

# dtype -> (multiple of the reference's own error, floor relative to max |exact value|)
TOLERANCE = {
    torch.float32: (2.0, 1e-6),
    torch.float16: (2.0, 1e-4),
    torch.bfloat16: (2.0, 1e-3),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def skip_unsupported(device: torch.device, dtype: torch.dtype, large: bool = False) -> None:
    """Skip what Triton's CPU interpreter cannot do (bf16) or cannot do in reasonable time (large shapes)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16; bf16 runs on cuda")
    if device.type == "cpu" and large:
        pytest.skip("DETR-sized shapes run on cuda only (the interpreter is too slow for them)")


def assert_within_low_precision(name, got, lowp, exact, dtype, magnitude=None):
    """|got - exact| <= multiple * |lowp - exact| + floor * magnitude (max norms; magnitude defaults to
    max|exact|), and got is finite."""
    multiple, floor = TOLERANCE[dtype]
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert torch.isfinite(got).all(), f"{name}: not finite"
    magnitude = exact.abs().max().item() if magnitude is None else magnitude
    error = (got.double() - exact).abs().max().item()
    reference_error = (lowp.double() - exact).abs().max().item()
    bound = multiple * reference_error + floor * magnitude
    assert error <= bound, (
        f"{name}: kernel error {error:.3g} > {bound:.3g} = {multiple} x reference {dtype} error "
        f"{reference_error:.3g} + {floor} x magnitude {magnitude:.3g}"
    )
