"""The fused box-loss kernels against the fp64 reference: values, every gradient, ties, degenerate and NaN boxes,
registration (opcheck, gradcheck, torch.compile) and dispatch.

On CPU the kernels run in Triton's interpreter (tests/helpers.py sets TRITON_INTERPRET=1) in fp64, fp32 and fp16;
with DETR_FAST_TEST_DEVICE=cuda the same tests run natively, bf16 included.

Low-precision criterion (flash-attention's, tests/helpers.py): the kernel's error against fp64 must be within a
small multiple of the error of the PyTorch reference run on the same inputs, plus a small floor relative to the
values' magnitude; each result is judged in its own dtype (the sums are float32 for float16 boxes, the gradients
float16). The fp64 reference is evaluated on the low-precision inputs themselves (upcast), so it measures the
arithmetic only. Float64 inputs compute in float64 and must agree with the reference to 1e-12.
"""

import pytest
import torch

from detr_fast import backend, ops, reference
from detr_fast.kernels import box_loss as box_loss_kernels

from ..helpers import assert_matches_fp64, compile_for_sm90, random_cxcywh, skip_unsupported

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# leading dims and pairs K: decoder layers x (images * queries) as the criterion calls it, no leading dim, two
# leading dims, and a row longer than one forward program (summed in parts)
SHAPES = [
    pytest.param((6,), 3 * 17, id="6x51"),
    pytest.param((6,), 2 * 100, id="6x200"),
    pytest.param((), 37, id="37"),
    pytest.param((2, 3), 13, id="2x3x13"),
    pytest.param((1,), box_loss_kernels.PAIRS_PER_PROGRAM + 811, id="1xlong"),
]


def loss_and_grads(fn, pred, tgt, weight, grad_l1, grad_giou):
    """(l1, giou, d pred, d tgt, d weight) of fn with output gradients grad_l1, grad_giou (d weight None for bool)."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in (pred, tgt, weight)]
    l1, giou = fn(*leaves)
    differentiable = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad((l1, giou), differentiable, (grad_l1.to(l1.dtype), grad_giou.to(giou.dtype))))
    return (l1.detach(), giou.detach(), *(next(grads) if t.requires_grad else None for t in leaves))


def kernel(pred, tgt, weight):
    with backend("kernel"):
        return ops.box_loss(pred, tgt, weight)


NAMES = ("l1", "giou", "grad pred", "grad tgt", "grad weight")


def assert_all_close(got, want, **tolerance):
    """assert_close on each of the five results of loss_and_grads, naming the one that differs."""
    for name, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, msg=lambda message, name=name: f"{name}: {message}", **tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leading,pairs", SHAPES)
def test_values_and_gradients_match_fp64(device, dtype, leading, pairs, poisoned_allocations):
    skip_unsupported(device, dtype)
    pred = random_cxcywh(*leading, pairs, device=device).to(dtype)
    tgt = random_cxcywh(*leading, pairs, device=device).to(dtype)
    weight = (torch.rand(*leading, pairs, device=device) < 0.5).to(dtype)  # about half the queries matched
    grad_l1 = torch.rand(leading, device=device) + 0.5  # grad_output != 1, one per row
    grad_giou = torch.rand(leading, device=device) - 1.5

    got = loss_and_grads(kernel, pred, tgt, weight, grad_l1, grad_giou)
    lowp = loss_and_grads(reference.box_loss, pred, tgt, weight, grad_l1, grad_giou)
    exact = loss_and_grads(reference.box_loss, pred.double(), tgt.double(), weight.double(), grad_l1, grad_giou)
    for name, g, lp, ex in zip(NAMES, got, lowp, exact, strict=True):
        assert_matches_fp64(name, g, lp, ex)


def test_fractional_weights_bool_weights_and_mixed_dtypes(device):
    pred = random_cxcywh(3, 29, device=device).to(torch.float16)
    tgt = random_cxcywh(3, 29, device=device)  # float32 targets with float16 predictions
    grad_l1, grad_giou = torch.rand(3, device=device), torch.rand(3, device=device)
    for weight in (torch.rand(3, 29, device=device), torch.rand(3, 29, device=device) < 0.5):
        got = loss_and_grads(kernel, pred, tgt, weight, grad_l1, grad_giou)
        want = loss_and_grads(reference.box_loss, pred, tgt, weight, grad_l1, grad_giou)
        for name, g, w in zip(NAMES, got, want, strict=True):
            if name == "grad weight" and weight.dtype == torch.bool:
                assert g is None and w is None
                continue
            assert g.dtype == w.dtype, name
            rtol = 2e-3 if g.dtype == torch.float16 else 1e-5
            torch.testing.assert_close(g, w, rtol=rtol, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def dyadic_tie_pairs(device, dtype):
    """cxcywh pairs whose corners are exact in every dtype and that hit every tie of the GIoU's max/min/clamp:
    identical, touching along x, along y and at a corner, nested strictly and sharing one or two edges, equal
    centers, one side shared, and disjoint with an empty intersection of exactly zero width."""
    xyxy = [
        ([0.25, 0.25, 0.75, 0.5], [0.25, 0.25, 0.75, 0.5]),  # identical
        ([0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 1.0]),  # touching along x = 0.5, different heights
        ([0.0, 0.0, 0.5, 0.25], [0.125, 0.25, 0.375, 0.75]),  # touching along y = 0.25
        ([0.0, 0.0, 0.25, 0.25], [0.25, 0.25, 0.5, 0.5]),  # touching at a corner
        ([0.25, 0.25, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]),  # nested strictly
        ([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]),  # nested, sharing x0 and y0
        ([0.25, 0.0, 0.75, 1.0], [0.0, 0.0, 1.0, 1.0]),  # nested, sharing y0 and y1
        ([0.25, 0.25, 0.75, 0.75], [0.375, 0.125, 0.625, 0.875]),  # equal centers, crossing
        ([0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5]),  # same rows, overlapping half
        ([0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 0.75, 0.75]),  # disjoint
    ]
    pred, tgt = (torch.tensor([pair[i] for pair in xyxy], device=device, dtype=torch.float64) for i in (0, 1))

    def to_cxcywh(b):
        return torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)

    return to_cxcywh(pred).to(dtype), to_cxcywh(tgt).to(dtype)


TIE_TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 1e-6), torch.float16: (1e-3, 1e-3)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("swap", [False, True], ids=["pred-tgt", "tgt-pred"])
def test_ties_take_the_reference_subgradients(device, dtype, swap):
    """Ties are exact in every dtype here, so the kernel must pick the same subgradient as autograd of the
    reference: half/half on max/min ties, the clamp passing at 0, sign(0) = 0."""
    pred, tgt = dyadic_tie_pairs(device, dtype)
    if swap:
        pred, tgt = tgt, pred
    weight = torch.ones(pred.shape[0], device=device, dtype=dtype)
    grad_l1, grad_giou = torch.tensor(0.75, device=device), torch.tensor(1.25, device=device)
    got = loss_and_grads(kernel, pred, tgt, weight, grad_l1, grad_giou)
    want = loss_and_grads(reference.box_loss, pred, tgt, weight, grad_l1, grad_giou)
    exact = loss_and_grads(reference.box_loss, pred.double(), tgt.double(), weight.double(), grad_l1, grad_giou)
    rtol, atol = TIE_TOLERANCE[dtype]  # rounding only: a different subgradient would be off by O(0.1)
    for name, g, w, ex in zip(NAMES, got, want, exact, strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(g.double(), ex, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_nested_shared_edges_split_the_gradient(device):
    """The value pinned in tests/reference/test_box_ops.py, through the kernel: d GIoU / d x0 = 1/16 for a box
    nested in the corner of another (cxcywh: d loss / d cx = -(1/16 + d/dx1) with d/dx1 from the far edges)."""
    inner = torch.tensor([[0.25, 0.25, 0.5, 0.5]], device=device, dtype=torch.float64)
    outer = torch.tensor([[0.5, 0.5, 1.0, 1.0]], device=device, dtype=torch.float64)
    weight = torch.ones(1, device=device, dtype=torch.float64)
    _, giou, grad_inner, grad_outer, _ = loss_and_grads(
        kernel, inner, outer, weight, torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    )
    assert giou.item() == 0.75  # 1 - GIoU, GIoU = 1/4
    exact = loss_and_grads(
        reference.box_loss, inner, outer, weight, torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    )
    assert torch.equal(grad_inner, exact[2]) and torch.equal(grad_outer, exact[3])


def degenerate_pairs(device, dtype):
    """Zero-width, zero-height, points (identical, distinct, on a common line), inverted (w < 0) boxes, each against
    a valid box and against each other."""
    boxes = torch.tensor(
        [
            [0.5, 0.5, 0.0, 0.25],  # zero width
            [0.5, 0.5, 0.25, 0.0],  # zero height
            [0.5, 0.5, 0.0, 0.0],  # point
            [0.25, 0.5, 0.0, 0.0],  # another point on the same row
            [0.75, 0.25, 0.0, 0.0],  # a point elsewhere
            [0.5, 0.5, -0.25, 0.25],  # inverted
            [0.5, 0.5, 0.5, 0.5],  # valid
        ],
        device=device,
        dtype=torch.float64,
    )
    i, j = torch.meshgrid(torch.arange(len(boxes)), torch.arange(len(boxes)), indexing="ij")
    return boxes[i.flatten()].to(dtype), boxes[j.flatten()].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_degenerate_boxes_match_the_reference_and_stay_finite(device, dtype):
    pred, tgt = degenerate_pairs(device, dtype)
    weight = torch.rand(pred.shape[0], device=device, dtype=dtype)
    grad_l1, grad_giou = torch.tensor(0.5, device=device), torch.tensor(2.0, device=device)
    got = loss_and_grads(kernel, pred, tgt, weight, grad_l1, grad_giou)
    want = loss_and_grads(reference.box_loss, pred, tgt, weight, grad_l1, grad_giou)
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert torch.isfinite(g).all(), name
        rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_coordinates_match_the_reference(device, value):
    """A non-finite coordinate in each of the 8 coordinates of a pair (one pair per case, weight 1 or 0): same NaN
    pattern as the reference in the sums and in every gradient; the other pairs' gradients are untouched."""
    cases = 16
    pred = random_cxcywh(cases, 5, device=device).to(torch.float64)
    tgt = random_cxcywh(cases, 5, device=device).to(torch.float64)
    for case in range(cases):
        which = pred if case % 8 < 4 else tgt
        which[case, 2, case % 4] = value
    weight = torch.ones(cases, 5, device=device, dtype=torch.float64)
    weight[8:, 2] = 0.0  # a non-finite box in an unmatched pair still makes the sum NaN (0 * NaN)
    grad_l1, grad_giou = torch.rand(cases, device=device), torch.rand(cases, device=device)
    got = loss_and_grads(kernel, pred, tgt, weight, grad_l1, grad_giou)
    want = loss_and_grads(reference.box_loss, pred, tgt, weight, grad_l1, grad_giou)
    assert_all_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert not torch.isfinite(got[1]).any()
    assert torch.isfinite(got[2][:, [0, 1, 3, 4]]).all()


def test_dyadic_grid_ties_everywhere(device):
    """Thousands of pairs with coordinates on a coarse dyadic grid: ties, touching, nested and degenerate boxes
    everywhere, all exact in float64: the kernel must equal the reference's autograd."""
    grid = torch.tensor([0.0, 0.125, 0.25, 0.375, 0.5, 0.625], device=device, dtype=torch.float64)
    pred, tgt = (grid[torch.randint(0, len(grid), (3, 701, 4), device=device)] for _ in range(2))
    weight = torch.rand(3, 701, device=device, dtype=torch.float64)
    grad_l1, grad_giou = torch.rand(3, device=device), torch.rand(3, device=device)
    got = loss_and_grads(kernel, pred, tgt, weight, grad_l1, grad_giou)
    want = loss_and_grads(reference.box_loss, pred, tgt, weight, grad_l1, grad_giou)
    assert_all_close(got, want, rtol=1e-12, atol=1e-12)


def test_hypothesis_grid_pairs(device):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    coordinate = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, -0.25])
    box = st.lists(coordinate, min_size=4, max_size=4)

    @hypothesis.given(st.lists(st.tuples(box, box, st.sampled_from([0.0, 1.0, 0.5])), min_size=1, max_size=24))
    @hypothesis.settings(max_examples=25)
    def check(pairs):
        pred = torch.tensor([p for p, _, _ in pairs], device=device, dtype=torch.float64)
        tgt = torch.tensor([t for _, t, _ in pairs], device=device, dtype=torch.float64)
        weight = torch.tensor([w for _, _, w in pairs], device=device, dtype=torch.float64)
        grad = torch.tensor(1.5, device=device)
        got = loss_and_grads(kernel, pred, tgt, weight, grad, -grad)
        want = loss_and_grads(reference.box_loss, pred, tgt, weight, grad, -grad)
        assert_all_close(got, want, rtol=1e-12, atol=1e-12)

    check()


def test_gradcheck_float64(device):
    pred = random_cxcywh(2, 5, device=device).to(torch.float64).requires_grad_()
    tgt = random_cxcywh(2, 5, device=device).to(torch.float64).requires_grad_()
    weight = torch.rand(2, 5, device=device, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(kernel, (pred, tgt, weight))


def test_only_one_output_used(device):
    """The gradient of an unused output arrives as zeros: l1 alone and giou alone."""
    pred = random_cxcywh(2, 7, device=device).requires_grad_()
    tgt = random_cxcywh(2, 7, device=device)
    weight = torch.ones(2, 7, device=device)
    for index in (0, 1):
        got = torch.autograd.grad(kernel(pred, tgt, weight)[index].sum(), pred)[0]
        want = torch.autograd.grad(reference.box_loss(pred, tgt, weight)[index].sum(), pred)[0]
        torch.testing.assert_close(got, want)


def test_empty_pairs_and_rows(device):
    pred = torch.zeros(3, 0, 4, device=device, requires_grad=True)
    l1, giou = kernel(pred, pred.detach(), torch.zeros(3, 0, device=device))
    assert torch.equal(l1, torch.zeros(3, device=device)) and torch.equal(giou, torch.zeros(3, device=device))
    (l1.sum() + giou.sum()).backward()
    assert pred.grad.shape == (3, 0, 4)
    none = torch.zeros(0, 5, 4, device=device)
    assert kernel(none, none, torch.zeros(0, 5, device=device))[0].shape == (0,)


def test_non_contiguous_inputs(device):
    storage = random_cxcywh(7, 2, 3, device=device)
    pred = storage[:, 0].transpose(0, 1)  # [3, 7, 4], strided
    tgt = random_cxcywh(3, 7, device=device)
    weight = torch.ones(7, 3, device=device).t()
    ones = torch.ones(3, device=device)
    got = loss_and_grads(kernel, pred, tgt, weight, ones, ones)
    want = loss_and_grads(reference.box_loss, pred, tgt, weight, ones, ones)
    assert_all_close(got, want)


def test_opcheck(device):
    pred = random_cxcywh(3, 11, device=device).requires_grad_()
    tgt = random_cxcywh(3, 11, device=device).requires_grad_()
    weight = (torch.rand(3, 11, device=device) < 0.5).float().requires_grad_()
    torch.library.opcheck(torch.ops.detr_fast.box_loss.default, (pred, tgt, weight))
    mixed = (pred.detach().half(), tgt.detach(), weight.detach() > 0)  # fp16 boxes, fp32 targets, bool weight
    torch.library.opcheck(torch.ops.detr_fast.box_loss.default, mixed)
    grads = (torch.rand(3, device=device), torch.rand(3, device=device))
    strided = random_cxcywh(11, 3, device=device).transpose(0, 1)  # [3, 11, 4], not contiguous
    for tgt_grad, weight_grad in ((False, False), (True, True)):
        for boxes in (pred.detach(), strided):
            torch.library.opcheck(
                torch.ops.detr_fast.box_loss_backward.default,
                (boxes, tgt.detach(), weight.detach(), *grads, tgt_grad, weight_grad),
            )
    torch.library.opcheck(torch.ops.detr_fast.box_loss.default, (strided.requires_grad_(), tgt, weight))


def test_torch_compile_fullgraph(device):
    """A criterion-like function (box_loss of every layer, scaled and summed) compiles whole and matches eager."""
    pred = random_cxcywh(3, 19, device=device).requires_grad_()
    tgt = random_cxcywh(3, 19, device=device)
    weight = (torch.rand(3, 19, device=device) < 0.5).float()

    def loss_fn(pred, tgt, weight):
        l1, giou = ops.box_loss(pred.sigmoid(), tgt, weight)
        return (5 * l1 + 2 * giou).sum() / weight.sum().clamp(min=1)

    with backend("kernel"):
        eager = loss_fn(pred, tgt, weight)
        (eager_grad,) = torch.autograd.grad(eager, pred)
        compiled = torch.compile(loss_fn, fullgraph=True)(pred, tgt, weight)
        (compiled_grad,) = torch.autograd.grad(compiled, pred)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_backend_selects_the_kernel(device, monkeypatch):
    calls = []
    forward = box_loss_kernels.box_loss_forward
    monkeypatch.setattr(box_loss_kernels, "box_loss_forward", lambda *a: calls.append(1) or forward(*a))
    pred = random_cxcywh(2, 5, device=device)
    weight = torch.ones(2, 5, device=device)
    with backend("reference"):
        ops.box_loss(pred, pred, weight)
    assert calls == []
    with backend("kernel"):
        ops.box_loss(pred, pred, weight)
    assert calls == [1]
    with backend("auto"):
        ops.box_loss(pred, pred, weight)
    assert calls == ([1, 1] if device.type == "cuda" else [1])  # auto: CPU tensors take the reference


def test_bad_arguments_raise(device):
    pred = random_cxcywh(2, 5, device=device)
    weight = torch.ones(2, 5, device=device)
    with pytest.raises(ValueError, match=r"pred_boxes has shape \(2, 5, 3\); expected \[..., K, 4\]"):
        ops.box_loss(pred[..., :3], pred[..., :3], weight)
    with pytest.raises(ValueError, match="tgt_boxes must have pred_boxes' shape"):
        ops.box_loss(pred, pred[:, :4], weight)
    with pytest.raises(ValueError, match="one weight per pair"):
        ops.box_loss(pred, pred, weight[:, :4])
    with pytest.raises(TypeError, match="weight must be float16, bfloat16, float32, float64, bool, got int64"):
        ops.box_loss(pred, pred, weight.long())


def test_the_op_refuses_cpu_tensors_without_the_interpreter(device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("CPU tensors without TRITON_INTERPRET=1: a CPU-only case")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pred = random_cxcywh(2, 5, device=device)
    with pytest.raises(RuntimeError, match="detr_fast::box_loss: the Triton kernel needs CUDA tensors"):
        torch.ops.detr_fast.box_loss(pred, pred, torch.ones(2, 5))
    with pytest.raises(RuntimeError, match="DETR_FAST_BACKEND=kernel on cpu tensors needs TRITON_INTERPRET=1"):
        kernel(pred, pred, torch.ones(2, 5))


def test_kernels_compile_for_sm90(device):
    variants = []
    for boxes, fp64 in (("fp32", False), ("fp16", False), ("bf16", False), ("fp64", True)):
        out = "*fp64" if fp64 else "*fp32"
        pairs = {"pred_ptr": f"*{boxes}", "tgt_ptr": f"*{boxes}", "weight_ptr": "*fp32"}
        forward = {**pairs, "l1_ptr": out, "giou_ptr": out, "num_pairs": "i32", "pairs_per_program": "i32"}
        forward.update(FP64="constexpr", BLOCK="constexpr")
        variants.append(("_box_loss_forward_kernel", forward, {"FP64": fp64, "BLOCK": box_loss_kernels.FORWARD_BLOCK},
                         box_loss_kernels.FORWARD_WARPS))  # fmt: skip
        backward = {
            **pairs,
            "grad_l1_ptr": out,
            "grad_giou_ptr": out,
            "grad_pred_ptr": f"*{boxes}",
            "grad_tgt_ptr": f"*{boxes}",
            "grad_weight_ptr": "*fp32",
            "num_pairs": "i32",
            "total_pairs": "i64",
        }
        backward.update(TGT_GRAD="constexpr", WEIGHT_GRAD="constexpr", FP64="constexpr", BLOCK="constexpr")
        for flags in (False, True):
            constexprs = {"TGT_GRAD": flags, "WEIGHT_GRAD": flags, "FP64": fp64}
            constexprs["BLOCK"] = box_loss_kernels.BACKWARD_BLOCK
            variants.append(("_box_loss_backward_kernel", backward, constexprs, box_loss_kernels.BACKWARD_WARPS))
    compile_for_sm90(device, "detr_fast.kernels.box_loss", variants)
