"""Images in, detections out: the image processor and end-to-end inference against transformers, side by side.

    python bench/inference.py [--quick] [--device cuda] [--out DIR]

1. Preprocessing of a batch of decoded COCO-sized images (PIL, 375..640 pixels a side, resized to 800 / 1333,
   normalized, padded): detr_fast.DetrImageProcessor against transformers' DetrImageProcessor (torchvision
   backend), the same pixels. On a GPU ours runs on the device (`device=`), transformers' its default.
2. End to end (decode from JPEG files, preprocess, forward, post-process), images/s: detr_fast's Detector (its
   default batch: one image on the CPU, where padding a batch only adds work; several on a GPU; and the whole set
   as one batch) against transformers' pipeline("object-detection") with the same weights (a DETR of random
   weights, ResNet-50; ResNet-18 with --quick), which runs one image at a time; the same detections.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
import common  # noqa: E402

from detr_fast import DetrForObjectDetection, DetrImageProcessor  # noqa: E402
from detr_fast.inference import Detector, predict_batch_size  # noqa: E402

# COCO val2017's most common sizes (height, width).
COCO_SIZES = [(480, 640), (427, 640), (640, 480), (375, 500), (480, 640), (424, 640), (500, 375), (612, 612)]
TARGETS = "Targets: preprocessing at least 3x transformers' images/s on the CPU; end to end at least 1.5x its pipeline."


def jpegs(folder: str, count: int) -> list[str]:
    """`count` random-noise JPEGs of COCO sizes in `folder` (their decoding costs what a photo's does)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        height, width = COCO_SIZES[i % len(COCO_SIZES)]
        path = os.path.join(folder, f"{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def preprocessing_rows(device: str, images: list[Image.Image], repeats: int) -> list[dict]:
    import transformers

    ours, theirs = DetrImageProcessor(), transformers.DetrImageProcessor()
    target = torch.device(device)
    fns = {
        "detr_fast": lambda: ours(images, device=target),
        "transformers": lambda: theirs(images, return_tensors="pt", device=device),
    }
    same = torch.equal(ours(images)["pixel_values"], theirs(images, return_tensors="pt")["pixel_values"])
    timings = common.time_all(fns, device, repeats)
    case = {"case": "preprocess", "B": len(images)}
    return [{**case, "impl": name, **t.columns(), "images_per_s": len(images) / t.ms * 1e3, "same_pixels": same}
            for name, t in timings.items()]  # fmt: skip


def inference_rows(device: str, paths: list[str], repeats: int, quick: bool) -> list[dict]:
    import transformers

    torch.manual_seed(0)
    backbone = "resnet18" if quick else "resnet50"
    config = transformers.DetrConfig(backbone=backbone, use_timm_backbone=True, use_pretrained_backbone=False,
                                     num_labels=91)  # fmt: skip
    hf_model = transformers.DetrForObjectDetection(config).to(device).eval()
    processor = transformers.DetrImageProcessor()
    pipeline = transformers.pipeline("object-detection", model=hf_model, image_processor=processor, device=device)
    detector = Detector(DetrForObjectDetection.from_transformers(hf_model), DetrImageProcessor(), device=device)
    batch = len(paths)
    fns = {
        "detr_fast": lambda: detector(paths, threshold=0.0, batch_size=predict_batch_size(torch.device(device))),
        "detr_fast batched": lambda: detector(paths, threshold=0.0, batch_size=batch),
        "transformers pipeline": lambda: pipeline(paths, threshold=0.0),
    }
    ours, theirs = detector(paths, threshold=0.5, batch_size=1), pipeline(paths, threshold=0.5)
    same = all(len(a) == len(b) for a, b in zip(ours, theirs))
    timings = common.time_all(fns, device, repeats)
    case = {"case": f"end to end, DETR-{backbone}", "B": batch}
    return [{**case, "impl": name, **t.columns(), "images_per_s": len(paths) / t.ms * 1e3, "same_detections": same}
            for name, t in timings.items()]  # fmt: skip


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    device = args.device
    repeats = args.repeats or (3 if args.quick else 5)
    info = common.environment(device)
    with tempfile.TemporaryDirectory() as folder:
        paths = jpegs(folder, 4 if args.quick else 8)
        images = [Image.open(path).convert("RGB") for path in paths]
        rows = preprocessing_rows(device, images, repeats) + inference_rows(device, paths, repeats, args.quick)
    common.record_end_load(info)
    find = common.row_of
    lines = [
        common.speedup_line(f"{device}, preprocess {len(images)} COCO-sized images",
                            find(rows, "detr_fast", case="preprocess"), find(rows, "transformers", case="preprocess"),
                            ("detr_fast", "transformers"), 3.0, info),
        common.speedup_line(f"{device}, end to end (decode, preprocess, forward, post-process)",
                            find(rows, "detr_fast", case=rows[-1]["case"]), find(rows, "transformers pipeline"),
                            ("detr_fast", "transformers' pipeline"), 1.5, info),
    ]  # fmt: skip
    notes = "\n".join([TARGETS, "", *[f"- {line}" for line in lines]])
    common.write_results("inference", rows, info, args.out, notes)
    return common.report_targets(lines)


if __name__ == "__main__":
    sys.exit(main())
