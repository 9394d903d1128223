"""The mask-loss paths (Triton kernels, the CPU path) against the fp64 reference: values and the logits'
gradient at odd and non-integer scales, images without targets, fully padded target rows and columns, the focal
loss's parameter variants, registration (opcheck, torch.compile) and what the backward saves.

The Triton kernels run in Triton's interpreter on CPU (backend "kernel", TRITON_INTERPRET=1 from tests/helpers.py),
natively with DETR_FAST_TEST_DEVICE=cuda. Low-precision results follow tests/helpers.py's criterion: the error
against the fp64 reference within a small multiple of the reference's own error on the same inputs.
"""

import pytest
import torch

from detr_fast import backend, ops, reference
from detr_fast.dispatch import triton_or_cpu_path
from detr_fast.kernels import mask_loss as mask_loss_kernels

from ..helpers import assert_matches_fp64, compile_for_sm90, skip_unsupported

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# (B, N, h, w, M, H, W): stride-4-like non-integer scales, an integer scale, a downscale, and more pixels than one
# program covers (the forward adds the parts)
SHAPES = [
    pytest.param((2, 7, 5, 7, 3, 19, 26), id="2x7-5x7-to-19x26"),
    pytest.param((1, 4, 4, 4, 2, 16, 16), id="1x4-4x4-to-16x16"),
    pytest.param((2, 3, 9, 11, 2, 7, 5), id="2x3-9x11-to-7x5"),
    pytest.param((1, 3, 23, 24, 2, 97, 91), id="1x3-23x24-to-97x91"),
]


def kernel(*args, **kwargs):
    with backend("kernel"):
        assert triton_or_cpu_path("mask_loss", args[0].device) == "triton"
        return ops.mask_loss(*args, **kwargs)


def cpu_path(*args, **kwargs):
    if args[0].device.type != "cpu":
        pytest.skip("the CPU path is for CPU tensors")
    with backend("auto"):
        assert triton_or_cpu_path("mask_loss", args[0].device) == "cpu"
        return ops.mask_loss(*args, **kwargs)


PATHS = [pytest.param(kernel, id="triton"), pytest.param(cpu_path, id="cpu")]


def random_problem(shape, device, dtype=torch.float32, soft=False):
    """pred_masks [B, N, h, w], a random one-to-one assignment [B, N] (image 0 with every target matched, the
    last image with one unmatched target slot), tgt_masks [B, M, H, W] zero outside a per-image valid region."""
    batch, queries, h, w, slots, height, width = shape
    pred = (torch.randn(batch, queries, h, w, device=device) * 3).to(dtype)
    assignment = torch.full((batch, queries), -1, dtype=torch.int64, device=device)
    for image in range(batch):
        matched = slots if image == 0 else max(slots - 1, 0)
        picked = torch.randperm(queries, device=device)[: min(matched, queries)]
        assignment[image, picked] = torch.arange(len(picked), device=device)
    tgt = torch.rand(batch, slots, height, width, device=device) < 0.3
    if soft:
        tgt = tgt * torch.rand(batch, slots, height, width, device=device)
    for image in range(1, batch):  # padding: the later images are smaller than the padded size
        tgt[image, :, height - height // 3 :] = 0
        tgt[image, :, :, width - width // 4 :] = 0
    return pred, assignment, tgt


def loss_and_grad(fn, pred, assignment, tgt, grad_focal=1.25, grad_dice=-0.5, **kwargs):
    """(focal, dice, d pred) of fn with output gradients grad_focal, grad_dice."""
    leaf = pred.detach().requires_grad_()
    focal, dice = fn(leaf, assignment, tgt, **kwargs)
    (grad,) = torch.autograd.grad(focal * grad_focal + dice * grad_dice, leaf)
    return focal.detach(), dice.detach(), grad


NAMES = ("focal", "dice", "grad pred_masks")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradient_match_fp64(device, path, dtype, shape, poisoned_allocations):
    skip_unsupported(device, dtype)
    pred, assignment, tgt = random_problem(shape, device, dtype)
    got = loss_and_grad(path, pred, assignment, tgt)
    lowp = loss_and_grad(reference.mask_loss, pred, assignment, tgt)
    exact = loss_and_grad(reference.mask_loss, pred.double(), assignment, tgt)
    for name, g, lp, ex in zip(NAMES, got, lowp, exact, strict=True):
        assert_matches_fp64(name, g, lp, ex)
    assert got[2][assignment < 0].abs().max() == 0, "an unmatched query got a gradient"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "alpha,gamma", [(-1.0, 2.0), (0.25, 0.0), (0.5, 1.0), (0.25, 1.5), (0.75, 3.0)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("soft", [False, True], ids=["bool-targets", "soft-targets"])
def test_focal_parameters_and_soft_targets(device, path, alpha, gamma, soft):
    pred, assignment, tgt = random_problem((2, 5, 6, 5, 3, 21, 17), device, torch.float64, soft=soft)
    got = loss_and_grad(path, pred, assignment, tgt, alpha=alpha, gamma=gamma)
    want = loss_and_grad(reference.mask_loss, pred, assignment, tgt, alpha=alpha, gamma=gamma)
    for name, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("path", PATHS)
def test_no_targets_and_no_matches_give_zero_loss_and_gradient(device, path):
    pred = torch.randn(2, 6, 5, 5, device=device)
    for slots in (0, 3):  # images without targets: no slots at all, or slots that no query is matched to
        tgt = torch.zeros(2, slots, 18, 20, dtype=torch.bool, device=device)
        assignment = torch.full((2, 6), -1, device=device)
        focal, dice, grad = loss_and_grad(path, pred, assignment, tgt)
        assert focal.item() == 0 and dice.item() == 0
        assert torch.equal(grad, torch.zeros_like(pred))


@pytest.mark.parametrize("path", PATHS)
def test_empty_target_masks_and_fully_padded_image(device, path):
    """A matched target whose mask is all padding (zero rows and columns everywhere): the dice loss is
    1 - 1 / (sum p + 1) and the focal loss that of an all-negative target, as the reference says."""
    pred = torch.randn(1, 3, 4, 6, device=device, dtype=torch.float64)
    assignment = torch.tensor([[-1, 0, 1]], device=device)
    tgt = torch.zeros(1, 2, 13, 22, dtype=torch.bool, device=device)
    tgt[0, 1, 2:9, 5:17] = True
    got = loss_and_grad(path, pred, assignment, tgt)
    want = loss_and_grad(reference.mask_loss, pred, assignment, tgt)
    for name, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("path", PATHS)
def test_nan_logits_stay_in_their_query(device, path):
    """NaN logits of an unmatched query change nothing; NaN logits of a matched query make both sums NaN."""
    pred, assignment, tgt = random_problem((2, 5, 4, 5, 2, 15, 19), device)
    unmatched = (assignment[0] < 0).nonzero()[0, 0]
    poisoned = pred.clone()
    poisoned[0, unmatched] = float("nan")
    got = loss_and_grad(path, poisoned, assignment, tgt)
    want = loss_and_grad(path, pred, assignment, tgt)
    for name, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    poisoned[0, (assignment[0] >= 0).nonzero()[0, 0]] = float("nan")
    focal, dice = path(poisoned, assignment, tgt)
    assert focal.isnan() and dice.isnan()


def test_what_autograd_keeps(device):
    """Between forward and backward the reference keeps several full-resolution buffers of the matched masks, the
    Triton kernels only their inputs (low-resolution logits, slot queries, targets), the CPU path its inputs but
    the logits, and the two derivatives its backward needs."""
    pred, assignment, tgt = random_problem((2, 6, 8, 10, 3, 32, 40), device)
    full_resolution = tgt.numel() * 4  # one fp32 [B, M, H, W] buffer

    def saved_bytes(fn):
        saved = []

        def pack(tensor):
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn(pred.detach().requires_grad_(), assignment, tgt)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        return sum(storages.values())

    inputs = pred.numel() * 4 + tgt.numel() + assignment.numel() * 8 * 2  # the slot queries are [B, M] int64
    if device.type == "cuda":
        assert saved_bytes(kernel) <= inputs
    else:
        assert saved_bytes(cpu_path) <= inputs + 2 * full_resolution
    assert saved_bytes(reference.mask_loss) >= 5 * full_resolution


def test_opcheck_cpu_path(device):
    pred, assignment, tgt = random_problem((2, 5, 4, 6, 3, 13, 17), device)
    slot_query = reference.slot_queries(assignment, 3)
    grad = torch.randn(2, 3, 4, device=device)
    forward_op = torch.ops.detr_fast.mask_loss_sums_cpu.default
    backward_op = torch.ops.detr_fast.mask_loss_sums_cpu_backward.default
    for inputs in ((pred, tgt), (pred.half(), tgt.float())):
        torch.library.opcheck(forward_op, (inputs[0].requires_grad_(), slot_query, inputs[1], 0.25, 2.0))
        _sums, d_focal, d_prob = forward_op(inputs[0].detach(), slot_query, inputs[1], 0.5, 1.5)
        torch.library.opcheck(backward_op, (d_focal, d_prob, slot_query, inputs[1], grad, 5, 4, 6))


def test_opcheck_triton_ops(device):
    pred, assignment, tgt = random_problem((1, 4, 3, 5, 2, 9, 11), device)
    slot_query = reference.slot_queries(assignment, 2)
    grad = torch.randn(1, 2, 4, device=device)
    with backend("kernel"):
        for masks in (tgt, tgt.float()):
            torch.library.opcheck(
                torch.ops.detr_fast.mask_loss_sums.default, (pred.requires_grad_(), slot_query, masks, 0.25, 2.0)
            )
            torch.library.opcheck(
                torch.ops.detr_fast.mask_loss_sums_backward.default,
                (pred.detach(), slot_query, masks, grad, 0.5, 1.5),
            )


def test_torch_compile_fullgraph(device):
    """The mask loss as the criterion calls it (assignment in, weighted sum out) compiles whole and matches eager."""
    pred, assignment, tgt = random_problem((2, 6, 5, 7, 3, 19, 26), device)

    def loss_fn(pred, assignment, tgt):
        focal, dice = ops.mask_loss(pred, assignment, tgt)
        return 2.0 * focal + 5.0 * dice

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    leaf = pred.detach().requires_grad_()
    eager = leaf.detach().clone().requires_grad_()
    got, want = compiled(leaf, assignment, tgt), loss_fn(eager, assignment, tgt)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(leaf.grad, eager.grad)


def test_errors_name_the_op_and_argument(device):
    pred, assignment, tgt = random_problem((2, 4, 3, 3, 2, 9, 9), device)
    with pytest.raises(ValueError, match=r"mask_loss: assignment has shape \(2, 3\), expected \[B, N\]"):
        ops.mask_loss(pred, assignment[:, :3], tgt)
    with pytest.raises(ValueError, match="mask_loss: tgt_masks has 1 images but pred_masks 2"):
        ops.mask_loss(pred, assignment, tgt[:1])
    with pytest.raises(TypeError, match="mask_loss: tgt_masks must be bool, float16"):
        ops.mask_loss(pred, assignment, tgt.to(torch.uint8))
    with pytest.raises(ValueError, match="mask_loss: pred_masks must have 4 dims"):
        ops.mask_loss(pred[0], assignment, tgt)
    with pytest.raises(ValueError, match="its h and w must be at least 1"):
        ops.mask_loss(pred[..., :0], assignment, tgt)


def test_kernels_compile_for_sm90(device):
    variants = []
    for logits, fp64 in (("fp32", False), ("fp16", False), ("bf16", False), ("fp64", True)):
        acc = "*fp64" if fp64 else "*fp32"
        sizes = {name: "i32" for name in ("slots", "h", "w", "H", "W", "queries")}
        sizes.update(alpha_arg="fp64", gamma_arg="fp64")
        flags = dict(HAS_ALPHA="constexpr", SQUARE="constexpr", FP64="constexpr", PIXELS="constexpr", BLOCK="constexpr")
        for square in (True, False):
            constexprs = dict(HAS_ALPHA=True, SQUARE=square, FP64=fp64)
            constexprs.update(PIXELS=mask_loss_kernels.PIXELS_PER_PROGRAM, BLOCK=mask_loss_kernels.BLOCK)
            for tgt in ("*u8", f"*{logits}"):
                pointers = {"pred_ptr": f"*{logits}", "query_ptr": "*i64", "tgt_ptr": tgt}
                forward = {**pointers, "out_ptr": acc, **sizes, **flags}
                backward = {**pointers, "grad_ptr": acc, "grad_pred_ptr": acc, **sizes, **flags}
                variants.append(("_mask_loss_forward_kernel", forward, constexprs, mask_loss_kernels.WARPS))
                variants.append(("_mask_loss_backward_kernel", backward, constexprs, mask_loss_kernels.WARPS))
    compile_for_sm90(device, "detr_fast.kernels.mask_loss", variants)
