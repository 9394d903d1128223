"""Benchmark the box ops: `match_cost` (every decoder layer in one launch) and `box_loss` forward+backward.

Grid: 6 decoder layers x images B in {8, 32, 64} x queries N in {100, 300, 900} x targets per image M in
{10, 50, 100}, 92 logits (COCO's 91 classes + no-object), float32 (and bfloat16 on CUDA at the target shapes).

match_cost implementations (all 6 layers per call):
  detr_fast kernel        ops.match_cost under backend("kernel"): one launch (CUDA only)
  transformers            HungarianMatcher's cost as its forward builds it before the scipy call, the (B*N) x sum(M)
                          matrix, once per layer as transformers' DETR loss calls it
  reference               detr_fast.reference.match_cost, eager
  reference compiled      torch.compile of it, dynamic shapes (compiled once for the whole grid)
  reference static        torch.compile of it for the one shape, at the target case only
box_loss implementations (forward + backward w.r.t. the predicted boxes, pairs = the B*N queries of each layer,
half of them matched):
  detr_fast kernel        ops.box_loss under backend("kernel") (CUDA only)
  reference               detr_fast.reference.box_loss, eager
  reference compiled      torch.compile of it, dynamic shapes; reference static: for the one shape, at the target
  torchvision             F.l1_loss + torchvision.ops.generalized_box_iou_loss on box_convert'ed corners, weighted

GB/s is against the bytes each op must move: match_cost reads logits, boxes and padded targets once and writes the
[L, B, N, M] cost; box_loss fwd+bwd reads both boxes and the weights once and writes the gradient of the boxes.
The issue's targets are printed next to the measurements (at 6 x 32 x 100 x 50; box_loss at 6 x 32 x 100), against
the faster of the two compiled references; the script exits 1 where one FAILs.

    python bench/box_ops.py --device cuda --out bench/results   # the full grid (bench/gpu_suite.sh runs this)
    python bench/box_ops.py --device cpu --quick                # reference paths, about a minute
"""

from __future__ import annotations

import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    environment,
    noise,
    parser,
    record_end_load,
    report_targets,
    row_of,
    speedup_line,
    time_all,
    verdict,
    write_results,
)

from detr_fast import backend, ops, reference  # noqa: E402

LAYERS = 6
NUM_LOGITS = 92  # COCO's 91 classes + no-object
COSTS = (1.0, 5.0, 2.0)  # class, bbox, giou: DETR's matcher weights
FULL_GRID = {"batch": (8, 32, 64), "queries": (100, 300, 900), "targets": (10, 50, 100)}
QUICK_GRID = {"batch": (8,), "queries": (100,), "targets": (10, 50)}
TARGET_CASE = (32, 100, 50)  # B, N, M of the targets
TARGETS = (
    "Targets (H100): match_cost 6x32x100x50 in one launch, >= 20x faster than transformers' cost, >= 2x faster than "
    "the compiled reference, within 2x of max(bytes / measured bandwidth, one kernel launch); box_loss fwd+bwd >= 5x "
    "faster than the eager reference and >= 1.5x faster than the compiled one."
)


def _compiled_match_cost(*args):
    return reference.match_cost(*args)


def _static_match_cost(*args):
    return reference.match_cost(*args)


def _compiled_box_loss(*args):
    return reference.box_loss(*args)


def _static_box_loss(*args):
    return reference.box_loss(*args)


# Two code objects per op, so that the dynamic and the static compilations keep separate dynamo caches.
COMPILED = {
    "match_cost": torch.compile(_compiled_match_cost, dynamic=True),
    "box_loss": torch.compile(_compiled_box_loss, dynamic=True),
}
STATIC = {"match_cost": _static_match_cost, "box_loss": _static_box_loss}


def compiled_references(op, target_case):
    """name -> compiled reference of `op`: the dynamic-shape one, and a static one at the target case."""
    compiled = {"reference compiled": COMPILED[op]}
    if target_case:
        compiled["reference static"] = torch.compile(STATIC[op], dynamic=False)
    return compiled


def random_boxes(*shape, device, dtype=torch.float32):
    """Valid cxcywh boxes [..., 4] inside the unit square."""
    cxcy = torch.rand(*shape, 2, device=device) * 0.6 + 0.2
    wh = torch.rand(*shape, 2, device=device) * 0.3 + 0.05
    return torch.cat([cxcy, wh], -1).to(dtype)


def transformers_cost_fn():
    """transformers' HungarianMatcher cost (before its scipy call) for one layer, or None without transformers."""
    try:
        from transformers.image_transforms import center_to_corners_format
        from transformers.loss.loss_for_object_detection import generalized_box_iou
    except ImportError:
        return None

    def cost(logits, pred_boxes, targets):  # logits [B, N, C+1], pred_boxes [B, N, 4], targets: list of dicts
        batch, queries = logits.shape[:2]
        prob = logits.flatten(0, 1).softmax(-1)  # [B*N, C+1]
        out_bbox = pred_boxes.flatten(0, 1)  # [B*N, 4]
        ids = torch.cat([t["class_labels"] for t in targets])
        tgt = torch.cat([t["boxes"] for t in targets])  # [sum M, 4]
        bbox_cost = torch.cdist(out_bbox, tgt, p=1)
        giou_cost = -generalized_box_iou(center_to_corners_format(out_bbox), center_to_corners_format(tgt))
        matrix = COSTS[1] * bbox_cost + COSTS[0] * -prob[:, ids] + COSTS[2] * giou_cost
        return matrix.view(batch, queries, -1)  # [B, N, sum M]

    return cost


def match_cost_case(batch, queries, targets, dtype, device, repeats):
    """Times of every match_cost implementation on one case, and the bytes the op must move."""
    logits = torch.randn(LAYERS, batch, queries, NUM_LOGITS, device=device, dtype=dtype)
    pred = random_boxes(LAYERS, batch, queries, device=device, dtype=dtype)
    labels = torch.randint(0, NUM_LOGITS - 1, (batch, targets), device=device)
    tgt = random_boxes(batch, targets, device=device)
    mask = torch.ones(batch, targets, dtype=torch.bool, device=device)
    per_image = [{"class_labels": labels[b], "boxes": tgt[b]} for b in range(batch)]

    fns, notes = {}, []
    if device == "cuda":

        def kernel():
            with backend("kernel"):
                return ops.match_cost(logits, pred, labels, tgt, mask, *COSTS)

        fns["detr_fast kernel"] = kernel
    theirs = transformers_cost_fn()
    if theirs is None:
        notes.append("transformers skipped: it is not installed")
    else:
        fns["transformers"] = lambda: [theirs(logits[i], pred[i], per_image) for i in range(LAYERS)]
    fns["reference"] = lambda: reference.match_cost(logits, pred, labels, tgt, mask, *COSTS)
    for name, compiled in compiled_references("match_cost", (batch, queries, targets) == TARGET_CASE).items():
        fns[name] = lambda compiled=compiled: compiled(logits, pred, labels, tgt, mask, *COSTS)
    with torch.no_grad():
        times = time_all(fns, device, repeats=repeats)
    size = dtype.itemsize
    moved = (
        LAYERS * batch * queries * (NUM_LOGITS + 4) * size  # logits, pred boxes
        + batch * targets * (8 + 16 + 1)  # int64 labels, float32 boxes, bool mask
        + LAYERS * batch * queries * targets * 4  # float32 cost
    )
    return times, moved, notes


def torchvision_loss_fn():
    """Weighted L1 + torchvision's generalized_box_iou_loss (cxcywh in), or None without torchvision."""
    try:
        from torchvision.ops import box_convert, generalized_box_iou_loss
    except ImportError:
        return None

    def loss(pred, tgt, weight):  # [L, K, 4], [L, K, 4], [L, K] -> ([L], [L])
        l1 = (F.l1_loss(pred.float(), tgt.float(), reduction="none").sum(-1) * weight).sum(-1)
        corners_p, corners_t = box_convert(pred.float(), "cxcywh", "xyxy"), box_convert(tgt.float(), "cxcywh", "xyxy")
        giou = (generalized_box_iou_loss(corners_p, corners_t, reduction="none") * weight).sum(-1)
        return l1, giou

    return loss


def box_loss_case(batch, queries, dtype, device, repeats):
    """Times of every box_loss forward+backward implementation on one case, the bytes the op must move, notes."""
    pairs = batch * queries
    pred = random_boxes(LAYERS, pairs, device=device, dtype=dtype).requires_grad_()
    tgt = random_boxes(LAYERS, pairs, device=device, dtype=dtype)
    weight = (torch.rand(LAYERS, pairs, device=device) < 0.5).float()
    grads = (torch.rand(LAYERS, device=device), torch.rand(LAYERS, device=device))

    def forward_backward(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(pred, tgt, weight), pred, grads)

    def kernel(p, t, w):
        with backend("kernel"):
            return ops.box_loss(p, t, w)

    impls = {"reference": reference.box_loss, **compiled_references("box_loss", (batch, queries) == TARGET_CASE[:2])}
    if device == "cuda":
        impls = {"detr_fast kernel": kernel, **impls}
    notes = []
    torchvision_loss = torchvision_loss_fn()
    if torchvision_loss is None:
        notes.append("torchvision skipped: it is not installed")
    else:
        impls["torchvision"] = torchvision_loss
    times = time_all({name: forward_backward(fn) for name, fn in impls.items()}, device, repeats=repeats)
    moved = LAYERS * pairs * (3 * 4 * dtype.itemsize + 4)  # pred, tgt, grad pred; float32 weights
    return times, moved, notes


def device_floors(device):
    """(GB/s of a large device copy, ms of one tiny kernel launch) on CUDA, or (None, None)."""
    if device != "cuda":
        return None, None
    source = torch.empty(2**28, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_ms = time_all({"copy": lambda: target.copy_(source)}, device)["copy"].ms
    tiny = torch.zeros(1, device=device)
    launch_ms = time_all({"launch": lambda: tiny.add_(1)}, device)["launch"].ms
    return 2 * source.numel() / (copy_ms * 1e-3) / 1e9, launch_ms


def rows_for(op, case, dtype, timings, moved, kernel_floor_ms=None):
    """One row per implementation of `op` on `case`; the kernel's row also gives its time over the floor."""
    rows = []
    for impl, timing in timings.items():
        row = dict(op=op, **case, dtype=str(dtype).replace("torch.", ""), impl=impl, **timing.columns(),
                   MB=moved / 1e6, GBps=moved / (timing.ms * 1e-3) / 1e9)  # fmt: skip
        if impl == "detr_fast kernel" and kernel_floor_ms:
            row["x_floor"] = timing.ms / kernel_floor_ms
        rows.append(row)
    return rows


def fastest_compiled(rows, case):
    """The row of the faster compiled reference (dynamic or static shapes) on `case`, or None."""
    compiled = [row_of(rows, impl, **case) for impl in ("reference compiled", "reference static")]
    return min((row for row in compiled if row), key=lambda row: row["ms"], default=None)


def floor_line(kernel_row, bandwidth, launch_ms, info):
    """The match_cost kernel's time against its floor: the larger of its bytes at the measured bandwidth and one
    launch."""
    kernel = kernel_row["ms"]
    floor = max(kernel_row["MB"] * 1e6 / (bandwidth * 1e9) * 1e3, launch_ms)
    spread, noisy = noise(info, kernel_row)
    return (
        f"{verdict(kernel / floor <= 2.0, noisy)} match_cost: {kernel:.4f} ms = {kernel / floor:.2f}x the floor "
        f"{floor:.4f} ms (max of {kernel_row['MB']:.1f} MB at the measured {bandwidth:.0f} GB/s, and one launch "
        f"{launch_ms:.4f} ms; {spread}) (target <= 2x)"
    )


def target_lines(rows, bandwidth, launch_ms, info):
    """The issue's targets at the target case, one PASS / FAIL / NOT MEASURED line each."""
    batch, queries, targets = TARGET_CASE
    match_case = dict(op="match_cost", B=batch, N=queries, M=targets, dtype="float32")
    loss_case = dict(op="box_loss fwd+bwd", B=batch, N=queries, dtype="float32")
    kernel_row = row_of(rows, "detr_fast kernel", **match_case)
    if kernel_row is None:
        return ["NOT MEASURED: the H100 targets (no kernel timings on this device: bench/gpu_suite.sh measures them)"]
    match = f"match_cost {LAYERS}x{batch}x{queries}x{targets} float32"
    loss_row = row_of(rows, "detr_fast kernel", **loss_case)
    loss = f"box_loss fwd+bwd {LAYERS}x{batch}x{queries} float32"
    return [
        speedup_line(
            match, kernel_row, row_of(rows, "transformers", **match_case), ("kernel", "transformers"), 20, info
        ),
        speedup_line(
            match, kernel_row, fastest_compiled(rows, match_case), ("kernel", "the compiled reference"), 2, info
        ),
        floor_line(kernel_row, bandwidth, launch_ms, info),
        speedup_line(
            loss, loss_row, row_of(rows, "reference", **loss_case), ("kernel", "the eager reference"), 5, info
        ),
        speedup_line(
            loss, loss_row, fastest_compiled(rows, loss_case), ("kernel", "the compiled reference"), 1.5, info
        ),
    ]


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    device, quick = args.device, args.quick
    grid = QUICK_GRID if quick else FULL_GRID
    repeats = args.repeats or (3 if quick else 7)
    notes = []
    if device == "cpu":
        # On a shared CPU a second intra-op thread mostly waits for a busy core: one thread measures the code.
        torch.set_num_threads(1)
        notes.append("CPU: reference paths only (the Triton kernels run natively on CUDA only), one thread")
    info = environment(device)
    if quick:
        notes.append(f"--quick: B {grid['batch']}, N {grid['queries']}, M {grid['targets']}, {repeats} repeats")
    bandwidth, launch_ms = device_floors(device)
    if bandwidth:
        notes.append(f"measured: device copy {bandwidth:.0f} GB/s, tiny kernel launch {launch_ms:.4f} ms")
    rows = []
    for batch, queries in itertools.product(grid["batch"], grid["queries"]):
        dtypes = [torch.float32]
        if device == "cuda" and (batch, queries) == TARGET_CASE[:2]:
            dtypes.append(torch.bfloat16)
        for dtype, targets in itertools.product(dtypes, grid["targets"]):
            timings, moved, skipped = match_cost_case(batch, queries, targets, dtype, device, repeats)
            notes.extend(skipped)
            floor = max(moved / (bandwidth * 1e9) * 1e3, launch_ms) if bandwidth else None
            rows += rows_for("match_cost", dict(L=LAYERS, B=batch, N=queries, M=targets), dtype, timings, moved, floor)
            print(f"match_cost {LAYERS}x{batch}x{queries}x{targets} {dtype}: "
                  + ", ".join(f"{k} {v.ms:.3f} ms" for k, v in timings.items()), flush=True)  # fmt: skip
        for dtype in dtypes:
            timings, moved, skipped = box_loss_case(batch, queries, dtype, device, repeats)
            notes.extend(skipped)
            floor = max(moved / (bandwidth * 1e9) * 1e3, launch_ms) if bandwidth else None
            rows += rows_for("box_loss fwd+bwd", dict(L=LAYERS, B=batch, N=queries), dtype, timings, moved, floor)
            print(f"box_loss {LAYERS}x{batch}x{queries} {dtype}: "
                  + ", ".join(f"{k} {v.ms:.3f} ms" for k, v in timings.items()), flush=True)  # fmt: skip
    record_end_load(info)
    lines = target_lines(rows, bandwidth, launch_ms, info)
    notes = [TARGETS, *[f"- {line}" for line in lines], *[f"- {n}" for n in dict.fromkeys(notes)]]
    write_results("box_ops", rows, info, args.out, notes="\n".join(notes))
    return report_targets(lines)


if __name__ == "__main__":
    sys.exit(main())
