"""Benchmark of the segmentation post-processing: detr_fast's DetrImageProcessor against transformers' on the same
model outputs (semantic, instance and panoptic results at the original image size).

The outputs are made to look like a trained model's: 30 of the 100 queries per image confident in one class each,
their masks discs of different sizes (logits falling off with the distance to a centre), the other queries'
classes and masks random. Each row also gives the number of segments of image 0 (the same for both, which the
tests check exactly on other inputs) and the peak memory one call allocates (peak_mib), measured in a fresh process
once the outputs exist (common.peak_memory_mib: on the CPU the peak resident set with glibc's mmap threshold fixed,
on CUDA the peak allocation); transformers' semantic result allocates a (C+1) x H x W map per image.

Cases: B=2 images, 100 queries, 250 classes (COCO panoptic), masks at 200 x 267 (stride 4), results at 800 x 1066.

    python bench/postprocess.py --device cpu --out bench/results
"""

from __future__ import annotations

import functools
import json
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
    verdict,
    worker_peak_mib,
    write_results,
)

from detr_fast import DetrImageProcessor  # noqa: E402
from detr_fast.model.outputs import DetrSegmentationOutput  # noqa: E402

TARGET = (
    "Targets: each post-processing mode at least 10x faster than transformers' (B=2, Q=100, 250 classes, 800x1066); "
    "the semantic result's peak memory (B=2) below one image's (C+1) x H x W fp32 map, which transformers allocates."
)
MODES = ("semantic", "instance", "panoptic")


def outputs(device: str, batch: int = 2, queries: int = 100, classes: int = 250, size=(200, 267)):
    """Model outputs with 30 confident queries per image whose masks are discs."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, queries, classes + 1, generator=generator)
    for query in range(30):
        logits[:, query, query % 40] += 10
    rows, cols = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    centre_y = torch.randint(0, size[0], (batch, queries, 1, 1), generator=generator)
    centre_x = torch.randint(0, size[1], (batch, queries, 1, 1), generator=generator)
    radius = torch.randint(8, 25, (batch, queries, 1, 1), generator=generator)
    masks = (radius - ((rows - centre_y) ** 2 + (cols - centre_x) ** 2).float().sqrt()) / 3
    return DetrSegmentationOutput(
        logits=logits.to(device), pred_boxes=torch.rand(batch, queries, 4).to(device), pred_masks=masks.to(device)
    )


def calls(mode: str, device: str) -> dict:
    """The post-processing call of `mode` by each implementation, on the benchmark's outputs."""
    import transformers

    out = outputs(device)
    kwargs = {"target_sizes": [(800, 1066)] * len(out.logits)}
    if mode != "semantic":
        kwargs["threshold"] = 0.5
    if mode == "panoptic":
        kwargs["label_ids_to_fuse"] = {1, 2, 3}
    processors = {"detr_fast": DetrImageProcessor(), "transformers": transformers.DetrImageProcessor()}
    return {
        impl: functools.partial(getattr(p, f"post_process_{mode}_segmentation"), out, **kwargs)
        for impl, p in processors.items()
    }


def measure_peak(mode: str, impl: str, device: str) -> float:
    """The worker: MiB allocated at the peak of one call of `mode` by `impl`, after a warm-up call."""
    fn = calls(mode, device)[impl]
    fn()  # warm-up: lazy initialisations and reused host buffers are not the call's allocation
    return peak_memory_mib(fn, device)


def semantic_memory_line(row: dict) -> str:
    """The target line of the semantic result's peak memory: below one (C+1) x H x W fp32 map (C = 250 classes)."""
    class_map_mib = 251 * 800 * 1066 * 4 / 2**20
    target = f"(target < {class_map_mib:.0f} MiB, one image's class map)"
    if row["peak_mib"] is None:  # no /proc to read the resident set from
        return f"{verdict(None)} semantic post-processing peak memory {target}"
    measured = f"semantic post-processing peak memory: detr_fast {row['peak_mib']:.1f} MiB"
    return f"{verdict(row['peak_mib'] < class_map_mib)} {measured} {target}"


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--worker",
        nargs=2,
        metavar=("MODE", "IMPL"),
        help="internal: measure one call's peak memory in this process and print it as JSON",
    )
    args = p.parse_args()
    if args.worker:
        print(json.dumps({"peak_mib": measure_peak(*args.worker, args.device)}))
        return 0
    import transformers

    device = args.device
    info = {**environment(device), "transformers": transformers.__version__}
    repeats = args.repeats or (3 if args.quick else 7)
    rows = []
    for mode in MODES[:1] if args.quick else MODES:
        fns = calls(mode, device)
        timings = time_all(fns, device, repeats=repeats)
        for impl, fn in fns.items():
            result = fn()[0]
            segments = None if mode == "semantic" else len(result["segments_info"])
            worker = [sys.executable, os.path.abspath(__file__), "--device", device, "--worker", mode, impl]
            rows.append(
                {"mode": mode, "B": 2, "Q": 100, "classes": 250, "size": "800x1066", "impl": impl,
                 **timings[impl].columns(), "segments": segments, "peak_mib": worker_peak_mib(worker)}
            )  # fmt: skip
    record_end_load(info)
    lines = [
        speedup_line(
            f"{device} {mode} post-processing",
            row_of(rows, "detr_fast", mode=mode),
            row_of(rows, "transformers", mode=mode),
            ("detr_fast", "transformers"),
            10.0,
            info,
        )
        for mode in dict.fromkeys(row["mode"] for row in rows)
    ]
    lines.append(semantic_memory_line(row_of(rows, "detr_fast", mode="semantic")))
    write_results("postprocess", rows, info, args.out, notes="\n".join([TARGET, *[f"- {line}" for line in lines]]))
    return report_targets(lines)


if __name__ == "__main__":
    sys.exit(main())
