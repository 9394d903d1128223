"""Benchmark of the `mask_loss` op (the matched masks' focal and dice losses, upsampling included), forward +
backward with respect to the mask logits, against its reference, torch.compile of the reference and transformers'
loss_masks, on the same logits, assignment and targets.

Implementations:
  detr_fast                 ops.mask_loss: the CPU path on the CPU, the Triton kernels on CUDA
  reference                 the same call under backend("reference"): autograd of the PyTorch reference
  reference + torch.compile torch.compile of detr_fast.reference.mask_loss (compiled for the one shape, warm-up
                            excluded)
  transformers              ImageLoss.loss_masks (its per-pair indexing and F.interpolate), the targets as a list of
                            float masks (its label format), which it pads itself
On CUDA each row also gives the peak memory the call allocates beyond its inputs (peak_mib).

Cases: the mask logits of 100 queries at stride 4 of B=2 images and 7 (CPU) or 20 (CUDA) target masks per image
at the image size: 128 x 160 and 256 x 320 on the CPU; COCO's 800 x 1066 on CUDA, in fp32 and bf16 logits.

    python bench/mask_loss.py --device cpu --out bench/results
    python bench/mask_loss.py --device cuda --out DIR
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    environment,
    parser,
    peak_memory_mib,
    record_end_load,
    report_targets,
    row_of,
    speedup_line,
    time_all,
    write_results,
)

from detr_fast import backend, ops, reference  # noqa: E402

TARGETS = "Target: the CPU path at least as fast as the reference, forward + backward (on the CPU)."
QUERIES = 100


def cases(device: str, quick: bool) -> list[dict]:
    """(image size, targets per image, logits dtype) of each case."""
    if device == "cuda":
        return [dict(size=(800, 1066), targets=20, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)]
    found = [
        dict(size=(128, 160), targets=7, dtype=torch.float32),
        dict(size=(256, 320), targets=7, dtype=torch.float32),
    ]
    return found[:1] if quick else found


def problem(case: dict, device: str):
    """(logits [2, 100, H/4, W/4] requiring grad, assignment [2, 100], padded masks [2, M, H, W] bool, transformers'
    labels and matcher indices)."""
    generator = torch.Generator().manual_seed(0)
    height, width = case["size"]
    counts = [case["targets"] - 2, case["targets"]]
    pred = torch.randn(len(counts), QUERIES, -(-height // 4), -(-width // 4), generator=generator)
    pred = pred.to(device=device, dtype=case["dtype"]).requires_grad_()
    masks = torch.rand(len(counts), case["targets"], height, width, generator=generator) < 0.4
    assignment = torch.full((len(counts), QUERIES), -1, dtype=torch.int64)
    labels, indices = [], []
    for image, count in enumerate(counts):
        masks[image, count:] = False
        queries = torch.randperm(QUERIES, generator=generator)[:count]
        assignment[image, queries] = torch.arange(count)
        labels.append({"masks": masks[image, :count].float().to(device)})
        indices.append((queries.to(device), torch.arange(count, device=device)))
    return pred, assignment.to(device), masks.to(device), labels, indices


def rows_of(case: dict, device: str, repeats: int) -> list[dict]:
    pred, assignment, masks, labels, indices = problem(case, device)
    num_boxes = float(sum(len(label["masks"]) for label in labels))
    compiled = torch.compile(reference.mask_loss)

    def reference_op(*args):
        with backend("reference"):
            return ops.mask_loss(*args)

    def call(fn):
        def run():
            focal, dice = fn(pred, assignment, masks)
            ((focal + dice) / num_boxes).backward()
            pred.grad = None

        return run

    fns = {
        "detr_fast": call(ops.mask_loss),
        "reference": call(reference_op),
        "reference + torch.compile": call(compiled),
    }
    try:
        from transformers.loss.loss_for_object_detection import ImageLoss
    except ImportError:
        ImageLoss = None
    if ImageLoss is not None:
        their_loss = ImageLoss(None, 1, 0.1, ["masks"])

        def transformers_loss():
            losses = their_loss.loss_masks({"pred_masks": pred}, labels, indices, num_boxes)
            (losses["loss_mask"] + losses["loss_dice"]).backward()
            pred.grad = None

        fns["transformers"] = transformers_loss
    timings = time_all(fns, device, repeats=repeats)
    height, width = case["size"]
    fields = dict(B=2, Q=QUERIES, M=case["targets"], H=height, W=width, dtype=str(case["dtype"]).replace("torch.", ""))
    return [
        {**fields, "impl": impl, **timings[impl].columns(), "peak_mib": peak_memory_mib(fn, device)}
        for impl, fn in fns.items()
    ]


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = args.device
    info = environment(device)
    repeats = args.repeats or (3 if args.quick else 7)
    rows = [row for case in cases(device, args.quick) for row in rows_of(case, device, repeats)]
    record_end_load(info)
    lines = []
    if device == "cpu":
        for height in dict.fromkeys(row["H"] for row in rows):
            ours, ref = (row_of(rows, impl, H=height) for impl in ("detr_fast", "reference"))
            where = f"CPU mask loss B=2 Q=100 {height}x{ours['W']}"
            lines.append(speedup_line(where, ours, ref, ("detr_fast", "its reference"), 1.0, info))
    write_results("mask_loss", rows, info, args.out, notes="\n".join([TARGETS, *[f"- {line}" for line in lines]]))
    return report_targets(lines)


if __name__ == "__main__":
    sys.exit(main())
