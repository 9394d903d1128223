"""What more than one test module, or a script the tests run in a subprocess, needs; test modules import from here
and never from each other.

- DEVICE: the device the suite runs on, DETR_FAST_TEST_DEVICE (cuda in bench/gpu_suite.sh) or cpu, where this module
  sets TRITON_INTERPRET=1 before torch and triton are imported (tests/conftest.py imports it first).
- The kernels against fp64: TOLERANCE and DTYPES, skip_unsupported (what Triton's interpreter cannot run),
  flash-attention's low-precision criterion (assert_within_low_precision, assert_matches_fp64) and
  compile_for_sm90 (Triton kernels compiled for an H100 without a GPU).
- Random inputs: random_cxcywh (normalized boxes), random_labels (per-image targets), and match_cost's problems
  (MATCH_COST_SHAPES, random_problem, assert_real_columns_within).
- The assignment solver against scipy: INF, solve, assert_matches_scipy, random_costs (also run under
  compute-sanitizer by tests/ops/sanitize_linear_assignment.py).
- Models: relative_error, tiny_config_kwargs, padded_batch, assert_outputs_equal.
- Data and training: write_split (a COCO split on disk), HAS_COCO, tiny_config (a TrainConfig that trains in a
  second or two, also imported by tests/test_train.py's subprocesses).
"""

# ruff: noqa: E402
# (DEVICE decides TRITON_INTERPRET, which must be set before anything below imports torch or triton.)

import os

DEVICE = os.environ.get("DETR_FAST_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize
import torch
from PIL import Image

from detr_fast import backend, pad_targets
from detr_fast.ops import linear_assignment
from detr_fast.ops.linear_assignment import STATUS_INFEASIBLE, STATUS_INVALID_ENTRY, STATUS_OK
from detr_fast.train import TrainConfig

# ------------------------------------------------------------------------------------------- kernels against fp64

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


def assert_matches_fp64(name, got, lowp, exact):
    """got (kernel) against exact (fp64 reference) with lowp (the reference on the same inputs) as the yardstick:
    float64 results to 1e-12, the others by the low-precision criterion of their own dtype."""
    assert got.dtype == lowp.dtype, f"{name}: dtype {got.dtype}, expected {lowp.dtype}"
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    else:
        assert_within_low_precision(name, got, lowp, exact, got.dtype)


# Compiles a list of (kernel, signature, constexprs, num_warps) for sm_90 in a fresh interpreter-free process.
_SM90_COMPILE = """
import importlib, json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module = importlib.import_module(sys.argv[1])
for name, signature, constexprs, warps in json.loads(sys.argv[2]):
    source = ASTSource(getattr(module, name), signature, constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
"""


def compile_for_sm90(device, module, variants):
    """Compile Triton kernels for an H100 (sm_90) without a GPU, with the ptxas triton ships: the interpreter runs
    Python and so misses what only the compiler rejects (non-constexpr globals, dtype mixes, scoping)."""
    from triton.compiler import ASTSource

    if device.type != "cpu":
        pytest.skip("on CUDA every test compiles the kernels for the real device")
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this triton's ASTSource takes another signature format")
    result = subprocess.run(
        [sys.executable, "-c", _SM90_COMPILE, module, json.dumps(variants)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------------- random inputs


def random_cxcywh(
    *shape, device, dtype=torch.float32, center_low=0.2, center_width=0.6, size_low=0.05, size_width=0.3, generator=None
):
    """Random normalized boxes [*shape, 4] (cx, cy, w, h), drawn in dtype: centres U(center_low, center_low +
    center_width), then sizes U(size_low, size_low + size_width). Computed as rand * width + low, so that the
    tests' fixed seeds give the values they were written with."""
    cxcy = torch.rand(*shape, 2, device=device, dtype=dtype, generator=generator) * center_width + center_low
    wh = torch.rand(*shape, 2, device=device, dtype=dtype, generator=generator) * size_width + size_low
    return torch.cat([cxcy, wh], -1)


def random_labels(counts, num_labels, device, labels_first=False):
    """transformers-style labels with `counts[i]` valid boxes (random_cxcywh) in image i (0 allowed). Each image's
    boxes are drawn before its class labels, or after them with labels_first (the order the kernel tests' inputs
    were drawn in, kept so that their fixed seeds give the same values)."""
    labels = []
    for m in counts:
        if labels_first:
            class_labels = torch.randint(0, num_labels, (m,), device=device)
            boxes = random_cxcywh(m, device=device)
        else:
            boxes = random_cxcywh(m, device=device)
            class_labels = torch.randint(0, num_labels, (m,), device=device)
        labels.append({"class_labels": class_labels, "boxes": boxes})
    return labels


# (leading dims, images B, queries N, target counts per image (M = max), classes C)
MATCH_COST_SHAPES = [
    pytest.param((6,), 17, [9, 4, 0], 7, id="6x3x17x9-c7"),  # M = 9, 14 of 27 slots padded
    pytest.param((6,), 100, [31, 12], 92, id="6x2x100x31-c92"),
    pytest.param((), 17, [5, 2], 7, id="2x17x5-c7"),
    pytest.param((2, 3), 9, [3], 3, id="2x3x1x9x3-c3"),
]


def random_problem(leading, queries, counts, classes, device, dtype, focal=False):
    """match_cost's inputs: logits [..., B, N, C+1] (C with focal), pred_boxes [..., B, N, 4] and padded targets."""
    batch = len(counts)
    logits = (2 * torch.randn(*leading, batch, queries, classes if focal else classes + 1, device=device)).to(dtype)
    pred = random_cxcywh(*leading, batch, queries, device=device).to(dtype)
    padded = pad_targets(random_labels(counts, classes, device, labels_first=True))
    return logits, pred, padded["class_labels"], padded["boxes"], padded["mask"]


def assert_real_columns_within(got, lowp, exact, mask):
    """Real target columns within the low-precision criterion; padded columns exactly +inf."""
    padded = ~mask[:, None, :].expand_as(got)
    assert (got[padded] == float("inf")).all(), "padded columns must be +inf"
    assert_matches_fp64("cost", got[~padded], lowp[~padded], exact[~padded])


# ------------------------------------------------------------------------------------- the solver against scipy

INF = float("inf")


def scipy_solution(block: np.ndarray) -> tuple[int, np.ndarray | None]:
    """(status, assignment [N] or None) of one [N, k] float64 block, by scipy.optimize.linear_sum_assignment."""
    if np.isnan(block).any() or np.isneginf(block).any():
        return STATUS_INVALID_ENTRY, None
    try:
        rows, cols = scipy.optimize.linear_sum_assignment(block)
    except ValueError:  # "cost matrix is infeasible"
        return STATUS_INFEASIBLE, None
    assignment = np.full(block.shape[0], -1, dtype=np.int64)
    assignment[rows] = cols
    return STATUS_OK, assignment


def total_cost(block: np.ndarray, assignment: np.ndarray) -> float:
    rows = np.flatnonzero(assignment >= 0)
    return float(block[rows, assignment[rows]].sum())


def poison_allocator(device: torch.device) -> None:
    """Leave garbage in memory the op's outputs are likely to reuse, so an unwritten output element shows."""
    torch.full((1 << 18,), 0x5A5A5A5A, dtype=torch.int64, device=device)


def solve(cost: torch.Tensor, num_targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The extension's assignment and status (strict=False), on the host."""
    poison_allocator(cost.device)
    with backend("kernel"):
        assignment, status = linear_assignment(cost, num_targets, strict=False)
    return assignment.cpu(), status.cpu()


def assert_matches_scipy(cost: torch.Tensor, num_targets: torch.Tensor, exact_indices: bool) -> None:
    """Solve cost [..., N, M] with the extension and compare every problem with scipy: same status; for a
    solved problem a valid complete assignment of the same total cost (float64 rounding aside) and, where
    `exact_indices` (continuous random costs: the optimum is unique), the same indices."""
    assignment, status = solve(cost, num_targets)
    n, m = cost.shape[-2:]
    assert assignment.shape == (*cost.shape[:-1],) and assignment.dtype == torch.int64
    assert status.shape == (*cost.shape[:-2],) and status.dtype == torch.uint8
    problems = int(np.prod(cost.shape[:-2]))
    costs = cost.detach().cpu().double().reshape(problems, n, m).numpy()
    counts = torch.broadcast_to(num_targets.cpu(), cost.shape[:-2]).reshape(-1).tolist()
    ours_all = assignment.reshape(problems, n).numpy()
    for p, (k, ours, code) in enumerate(zip(counts, ours_all, status.reshape(-1).tolist(), strict=True)):
        block = costs[p, :, :k]
        expected_status, expected = scipy_solution(block)
        assert code == expected_status, f"problem {p}: status {code}, scipy {expected_status}"
        if expected is None:
            assert (ours == -1).all(), f"problem {p}: rows of an unsolved problem must be -1"
            continue
        matched = ours[ours >= 0]
        assert len(matched) == min(n, k) and len(set(matched.tolist())) == len(matched), f"problem {p}"
        assert (matched < k).all(), f"problem {p}: a column beyond num_targets={k}"
        ours_total, scipy_total = total_cost(block, ours), total_cost(block, expected)
        assert np.isfinite(ours_total), f"problem {p}: a forbidden (+inf) pair was matched"
        scale = np.abs(block[np.isfinite(block)]).max(initial=0.0) * max(min(n, k), 1)
        assert abs(ours_total - scipy_total) <= 1e-12 * scale, f"problem {p}: cost {ours_total} != {scipy_total}"
        if exact_indices:
            np.testing.assert_array_equal(ours, expected, err_msg=f"problem {p}")


def random_costs(rng: np.random.Generator, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """float64 costs of one kind: continuous (unique optimum), small integers (ties), huge range, +inf edges."""
    if kind == "uniform":
        return rng.random(shape)
    if kind == "normal":  # negative costs too
        return rng.normal(0.0, 100.0, shape)
    if kind == "small_integers":
        return rng.integers(0, 4, shape).astype(np.float64)
    if kind == "huge_range":
        return rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(-12, 12, shape)
    if kind == "forbidden_pairs":
        costs = rng.random(shape)
        costs[rng.random(shape) < rng.choice([0.1, 0.5, 0.9])] = INF
        return costs
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------------------- models


def relative_error(ours: torch.Tensor, theirs: torch.Tensor, floor: float = 1e-6) -> float:
    """max |ours - theirs| / max(max |theirs|, floor). The floor keeps tensors that are zero up to rounding (the
    key-projection bias gradient, which softmax cancels exactly) from turning float noise into a large ratio."""
    scale = max(theirs.abs().max().item(), floor)
    return (ours.double() - theirs.double()).abs().max().item() / scale


def tiny_config_kwargs(backbone: str = "resnet18", auxiliary_loss: bool = False, **overrides) -> dict:
    """Fields that transformers' DetrConfig and ours share, for a model that runs in a second on the CPU."""
    kwargs = dict(
        backbone=backbone,
        use_timm_backbone=True,
        use_pretrained_backbone=False,
        num_labels=7,
        d_model=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=96,
        num_queries=12,
        auxiliary_loss=auxiliary_loss,
        dropout=0.0,
    )
    kwargs.update(overrides)
    return kwargs


def our_names_to_theirs(ours, theirs) -> dict[str, str]:
    """detr_fast parameter name -> the transformers name of the same tensor, in the installed version's layout."""
    from detr_fast.model.weights import detect_layout, from_detr_fast

    names = [n for n, _ in ours.named_parameters()]
    layout = detect_layout(theirs.state_dict())
    return dict(zip(names, from_detr_fast(dict.fromkeys(names), layout), strict=True))


def padded_batch(device, sizes=((64, 96), (48, 80), (64, 50)), channels=3):
    """Images of different sizes padded to the largest, as a DETR collate does: (pixel_values, pixel_mask)."""
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    pixel_values = torch.zeros(len(sizes), channels, height, width, device=device)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.long, device=device)
    for i, (h, w) in enumerate(sizes):
        pixel_values[i, :, :h, :w] = torch.randn(channels, h, w, device=device)
        pixel_mask[i, :h, :w] = 1
    return pixel_values, pixel_mask


def assert_outputs_equal(got, expected, tolerance: float) -> None:
    """Two detection outputs (ours or transformers') agree: logits, boxes, the loss dict key by key (same keys in
    the same order), the loss, and every auxiliary layer's logits and boxes, to `tolerance` relative."""
    assert relative_error(got.logits, expected.logits) < tolerance
    assert relative_error(got.pred_boxes, expected.pred_boxes) < tolerance
    if expected.loss_dict is not None:
        assert list(got.loss_dict) == list(expected.loss_dict)
        for key, value in expected.loss_dict.items():
            assert relative_error(got.loss_dict[key], value) < tolerance, key
        assert relative_error(got.loss, expected.loss) < tolerance
    if expected.auxiliary_outputs is not None:
        assert len(got.auxiliary_outputs) == len(expected.auxiliary_outputs)
        for ours, theirs in zip(got.auxiliary_outputs, expected.auxiliary_outputs):
            assert relative_error(ours["logits"], theirs["logits"]) < tolerance
            assert relative_error(ours["pred_boxes"], theirs["pred_boxes"]) < tolerance


# ------------------------------------------------------------------------------------------- data and training


def write_split(root, images, annotations, categories=((3, "cat"), (7, "dog"), (11, "emu"))):
    """Images given as (file_name, width, height) are written as flat grey PNGs; returns (image_dir, json_path)."""
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    entries = []
    for image_id, (file_name, width, height) in enumerate(images, start=1):
        Image.new("RGB", (width, height), (90, 90, 90)).save(os.path.join(image_dir, file_name))
        entries.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    annotations = [{"id": i, "iscrowd": 0, **a} for i, a in enumerate(annotations, start=100)]
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump(
            {
                "images": entries,
                "annotations": annotations,
                "categories": [{"id": c, "name": n} for c, n in categories],
            },
            f,
        )
    return image_dir, path


# train() evaluates with pycocotools; the GPU machine has none, so there the runs skip evaluation (cfg.evaluate)
# and only the tests that check metrics skip.
HAS_COCO = importlib.util.find_spec("pycocotools") is not None


def tiny_config(root, device="cpu", **overrides) -> TrainConfig:
    """A run that takes a second or two on a CPU: 64-pixel synthetic images, a 1+2-layer transformer of width 32.
    Dropout, flips and multi-scale resizing are on, so that resuming has RNG state to get right."""
    values = dict(
        dataset="synthetic",
        data_dir=os.path.join(root, "data"),
        output_dir=os.path.join(root, "run"),
        synthetic_train_images=16,
        synthetic_val_images=4,
        synthetic_spec={"min_size": 64, "max_size": 64, "max_objects": 3, "min_object_fraction": 0.25},
        scales=(48, 56, 64),
        max_size=64,
        crop_resize=None,
        crop_size=None,
        eval_size=None,
        max_targets=3,
        model=dict(
            backbone="resnet18",
            backbone_kwargs={"out_indices": [1, 2], "zero_init_last": False},
            d_model=32,
            encoder_layers=1,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_queries=6,
            dropout=0.1,
            auxiliary_loss=True,
        ),
        train_backbone_stem=True,
        batch_size=4,
        lr=1e-3,
        lr_backbone_multiplier=0.5,
        clip_max_norm=1.0,
        warmup_steps=2,
        steps=6,
        num_workers=0,
        threads=1,
        log_every=1,
        checkpoint_every=100,
        seed=3,
        device=str(device),
        evaluate=HAS_COCO,
    )
    model = {**values.pop("model"), **overrides.pop("model", {})}
    return TrainConfig(**{**values, **overrides, "model": model})
