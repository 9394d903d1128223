"""The match_cost kernel against the fp64 reference: every layer and image in one launch, softmax and focal class
costs, padding, label range, degenerate and NaN boxes, strides, registration (opcheck, torch.compile), dispatch.

On CPU the kernel runs in Triton's interpreter (tests/helpers.py sets TRITON_INTERPRET=1) in fp64, fp32 and fp16;
with DETR_FAST_TEST_DEVICE=cuda the same tests run natively, bf16 included. Low-precision criterion as in
tests/ops/test_box_loss.py: the kernel's error against fp64 within a small multiple of the PyTorch reference's
error on the same inputs, plus a small floor.
"""

import pytest
import torch
import triton

from detr_fast import backend, ops, pad_targets, reference
from detr_fast.kernels import match_cost as match_cost_kernels

from ..helpers import (
    MATCH_COST_SHAPES,
    assert_real_columns_within,
    compile_for_sm90,
    random_cxcywh,
    random_problem,
    skip_unsupported,
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def kernel(*args, **kwargs):
    with backend("kernel"):
        return ops.match_cost(*args, **kwargs)


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("focal", [False, True], ids=["softmax", "focal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leading,queries,counts,classes", MATCH_COST_SHAPES)
def test_matches_fp64_reference(device, dtype, leading, queries, counts, classes, focal):
    skip_unsupported(device, dtype)
    logits, pred, labels, tgt, mask = random_problem(leading, queries, counts, classes, device, dtype, focal)
    weights = (1.1, 4.9, 0.3)  # not exact in binary: a GPU kernel that took them as fp32 misses fp64's bound
    got = kernel(logits, pred, labels, tgt, mask, *weights, focal=focal)
    lowp = reference.match_cost(logits, pred, labels, tgt, mask, *weights, focal=focal)
    exact = reference.match_cost(logits.double(), pred.double(), labels, tgt.double(), mask, *weights, focal=focal)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.shape == (*leading, len(counts), queries, max(counts)) and got.dtype == expected_dtype
    assert_real_columns_within(got, lowp, exact, mask)


def test_every_layer_in_one_launch(device, monkeypatch):
    """6 decoder layers x 3 images: a single kernel launch, and each layer equals its own separate call."""
    logits, pred, labels, tgt, mask = random_problem((6,), 17, [9, 4, 0], 7, device, torch.float32)
    launches = []
    launcher = match_cost_kernels._match_cost_kernel

    class CountingLauncher:
        def __getitem__(self, grid):
            launches.append(grid)
            return launcher[grid]

    monkeypatch.setattr(match_cost_kernels, "_match_cost_kernel", CountingLauncher())
    all_layers = kernel(logits, pred, labels, tgt, mask)
    assert launches == [(6 * 3, triton.cdiv(17, match_cost_kernels.BLOCK_N))]  # layers x images, query blocks
    for layer in range(6):
        torch.testing.assert_close(all_layers[layer], kernel(logits[layer], pred[layer], labels, tgt, mask))


@pytest.mark.parametrize("alpha,gamma", [(0.5, 0.0), (0.3, 1.5)])
def test_focal_alpha_and_gamma(device, alpha, gamma):
    logits, pred, labels, tgt, mask = random_problem((2,), 11, [5, 3], 6, device, torch.float32, focal=True)
    logits[0, 0, 0, 0] = -200.0  # sigmoid underflows to 0: 0 ** gamma, including 0 ** 0 = 1
    kwargs = {"focal": True, "focal_alpha": alpha, "focal_gamma": gamma}
    got = kernel(logits, pred, labels, tgt, mask, **kwargs)
    exact = reference.match_cost(logits.double(), pred.double(), labels, tgt.double(), mask, **kwargs)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_many_classes_and_masked_logits(device):
    """More classes than one softmax chunk (300 > 128), whole chunks of -inf logits (masked classes) before the
    finite ones, and a row of only -inf logits (NaN, as softmax gives)."""
    logits, pred, labels, tgt, mask = random_problem((2,), 9, [4, 2], 299, device, torch.float32)
    logits[0, 0, :3, :200] = float("-inf")  # the first chunk entirely -inf for three queries
    logits[1, 1, 5] = float("-inf")
    labels[:, 0] = 250  # a label whose logit stays finite
    got = kernel(logits, pred, labels, tgt, mask)
    exact = reference.match_cost(logits.double(), pred.double(), labels, tgt.double(), mask)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got[1, 1, 5, :2].isnan().all() and got[0, 0, :3, 0].isfinite().all()


def test_labels_out_of_range_and_int32_labels(device):
    logits, pred, labels, tgt, mask = random_problem((3,), 13, [4, 3], 5, device, torch.float32)
    labels[0, 0], labels[0, 1] = -1, 6  # real targets: NaN (6 classes: 0..5 are valid)
    labels[1, 3] = 1000  # a padded slot: stays +inf
    got = kernel(logits, pred, labels.int(), tgt, mask)
    want = reference.match_cost(logits, pred, labels, tgt, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got[:, 0, :, :2].isnan().all() and (got[:, 1, :, 3] == float("inf")).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_degenerate_and_non_finite_boxes(device):
    boxes = torch.tensor(
        [[0.5, 0.5, 0.0, 0.25], [0.5, 0.5, 0.25, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25, 0.5, 0.0, 0.0],
         [0.5, 0.5, -0.25, 0.25], [0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]],
        device=device,
    )  # fmt: skip
    pred = torch.cat([boxes, boxes[:3]]).clone()[None]  # [1, 10, 4]
    pred[0, 7, 0] = float("nan")
    pred[0, 8, 2] = float("inf")
    pred[0, 9, 3] = float("-inf")
    logits = torch.randn(1, 10, 4, device=device)
    labels = torch.zeros(1, 7, dtype=torch.int64, device=device)
    mask = torch.ones(1, 7, dtype=torch.bool, device=device)
    got = kernel(logits, pred, labels, boxes[None], mask)
    want = reference.match_cost(logits, pred, labels, boxes[None], mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert got[0, :7].isfinite().all() and not got[0, 7:].isfinite().any()


def test_strided_inputs(device):
    """Logits sliced out of a wider tensor with the layer dim permuted, and strided boxes: no copy needed."""
    wide = torch.randn(3, 6, 11, 10, device=device)  # [B, L, N, 10]
    logits = wide[..., :8].transpose(0, 1)  # [L, B, N, 8], class stride 1
    pred = random_cxcywh(3, 6, 11, device=device).transpose(0, 1)
    padded = pad_targets([{"class_labels": torch.tensor([1, 6]), "boxes": random_cxcywh(2, device="cpu")}] * 3)
    labels, tgt, mask = (padded[k].to(device) for k in ("class_labels", "boxes", "mask"))
    torch.testing.assert_close(
        kernel(logits, pred, labels, tgt, mask), reference.match_cost(logits, pred, labels, tgt, mask)
    )


def test_empty_problems(device):
    logits, pred, labels, tgt, mask = random_problem((2,), 5, [1, 1], 3, device, torch.float32)
    assert kernel(logits, pred, labels[:, :0], tgt[:, :0], mask[:, :0]).shape == (2, 2, 5, 0)
    assert kernel(logits[:, :, :0], pred[:, :, :0], labels, tgt, mask).shape == (2, 2, 0, 1)


def test_opcheck(device):
    logits, pred, labels, tgt, mask = random_problem((2,), 7, [3, 1], 4, device, torch.float32)
    for focal in (False, True):
        args = (logits, pred, labels, tgt, mask, 1.0, 5.0, 2.0, focal, 0.25, 2.0)
        torch.library.opcheck(torch.ops.detr_fast.match_cost.default, args)
    args = (logits.half(), pred.half(), labels.int(), tgt, mask, 1.0, 5.0, 2.0, False, 0.25, 2.0)
    torch.library.opcheck(torch.ops.detr_fast.match_cost.default, args)
    strided = (logits.transpose(0, 1).contiguous().transpose(0, 1), pred.transpose(0, 1).contiguous().transpose(0, 1))
    torch.library.opcheck(torch.ops.detr_fast.match_cost.default, (*strided, *args[2:]))


def test_torch_compile_fullgraph(device):
    """The criterion's matching prologue (cost, then non-finite real entries to float32 max) compiles whole."""
    logits, pred, labels, tgt, mask = random_problem((3,), 17, [5, 2, 0], 7, device, torch.float32)

    def costs(logits, pred, labels, tgt, mask):
        cost = ops.match_cost(logits, pred.sigmoid(), labels, tgt, mask)
        return torch.where(mask[:, None, :] & ~cost.isfinite(), torch.finfo(torch.float32).max, cost)

    with backend("kernel"):
        eager = costs(logits, pred, labels, tgt, mask)
        compiled = torch.compile(costs, fullgraph=True)(logits, pred, labels, tgt, mask)
    torch.testing.assert_close(compiled, eager)


def test_backend_selects_the_kernel(device, monkeypatch):
    calls = []
    forward = match_cost_kernels.match_cost_forward
    monkeypatch.setattr(match_cost_kernels, "match_cost_forward", lambda *a: calls.append(1) or forward(*a))
    problem = random_problem((), 5, [2], 3, device, torch.float32)
    with backend("reference"):
        ops.match_cost(*problem)
    assert calls == []
    with backend("kernel"):
        ops.match_cost(*problem)
    assert calls == [1]
    with backend("auto"):
        ops.match_cost(*problem)
    assert calls == ([1, 1] if device.type == "cuda" else [1])  # auto: CPU tensors take the reference


def test_bad_arguments_raise(device):
    logits, pred, labels, tgt, mask = random_problem((2,), 5, [2, 1], 3, device, torch.float32)
    with pytest.raises(ValueError, match="focal_alpha must be in \\[0, 1\\], got 1.5"):
        ops.match_cost(logits, pred, labels, tgt, mask, focal=True, focal_alpha=1.5)
    with pytest.raises(ValueError, match="focal_gamma must be >= 0, got -1"):
        ops.match_cost(logits, pred, labels, tgt, mask, focal=True, focal_gamma=-1.0)
    with pytest.raises(ValueError, match="pred_boxes has shape"):
        ops.match_cost(logits, pred[..., :3], labels, tgt, mask)
    with pytest.raises(TypeError, match="tgt_labels must be int64, int32, got float32"):
        ops.match_cost(logits, pred, labels.float(), tgt, mask)
    with pytest.raises(ValueError, match="its last dim \\(classes\\) must not be empty"):
        ops.match_cost(logits[..., :0], pred, labels, tgt, mask)


def test_the_op_refuses_cpu_tensors_without_the_interpreter(device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("CPU tensors without TRITON_INTERPRET=1: a CPU-only case")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = (*random_problem((), 5, [2], 3, device, torch.float32), 1.0, 5.0, 2.0, False, 0.25, 2.0)
    with pytest.raises(RuntimeError, match="detr_fast::match_cost: the Triton kernel needs CUDA tensors"):
        torch.ops.detr_fast.match_cost(*args)


def test_kernel_compiles_for_sm90(device):
    variants = []
    for dtype, fp64 in (("fp32", False), ("fp16", False), ("bf16", False), ("fp64", True)):
        signature = {"logits_ptr": f"*{dtype}", "pred_ptr": f"*{dtype}", "labels_ptr": "*i64", "tgt_ptr": "*fp32",
                     "mask_ptr": "*i1", "out_ptr": "*fp64" if fp64 else "*fp32"}  # fmt: skip
        signature.update({name: "i32" for name in ("num_images", "num_queries", "num_targets", "num_logits")})
        signature.update({f"stride_logits_{dim}": "i32" for dim in ("layer", "image", "query")})
        signature.update({name: "fp64" for name in ("class_w", "bbox_w", "giou_w", "focal_alpha", "focal_gamma")})
        signature.update({name: "constexpr" for name in ("FOCAL", "FP64", "BLOCK_N", "BLOCK_M", "BLOCK_C")})
        for focal in (False, True):
            constexprs = {"FOCAL": focal, "FP64": fp64, "BLOCK_N": match_cost_kernels.BLOCK_N}
            constexprs.update(BLOCK_M=match_cost_kernels.MAX_BLOCK_M, BLOCK_C=match_cost_kernels.MAX_BLOCK_C)
            variants.append(("_match_cost_kernel", signature, constexprs, match_cost_kernels.NUM_WARPS))
    compile_for_sm90(device, "detr_fast.kernels.match_cost", variants)
