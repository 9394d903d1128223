"""Segmentation data in, model input out: mask decoding and transforms per image against transformers' processor.

    python bench/segmentation_data.py [--quick] [--out DIR]

A batch of COCO-sized images (375..640 pixels a side) is read from its files, its masks made, resized with the
image to 800 / 1333, normalized and padded, two ways:

1. coco_detection with instance masks (polygons of 32 points, 7 objects per image as in COCO): detr_fast's
   CocoDetection(masks=True) items with the evaluation transforms, collated; detr_fast.DetrImageProcessor and
   transformers' DetrImageProcessor (torchvision backend) with return_segmentation_masks=True on the decoded image
   and its annotations.
2. coco_panoptic (PNG + segments_info: the synthetic panoptic set at COCO sizes, up to 8 things over 2-3 stuff
   regions): detr_fast's CocoPanoptic items, collated; both processors with format="coco_panoptic" and masks_path.

Every implementation decodes the image (and the PNG) from its file inside the timed call. "same_masks": the padded
masks of each implementation equal transformers' (bool); "same_pixels" the pixel values within 1e-5.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
import common  # noqa: E402
from inference import jpegs  # noqa: E402

from detr_fast import DetrImageProcessor  # noqa: E402
from detr_fast.data.collate import collate  # noqa: E402
from detr_fast.data.datasets import CocoDetection, CocoPanoptic  # noqa: E402
from detr_fast.data.synthetic import SyntheticSpec, write_coco_panoptic  # noqa: E402
from detr_fast.data.transforms import eval_transforms  # noqa: E402

TARGETS = "No target in the issue: the figures say what a user's data loading costs against transformers' processor."
OBJECTS_PER_IMAGE = 7
POLYGON_POINTS = 32


def instance_annotations(paths: list[str], seed: int = 0) -> dict:
    """A COCO instances JSON for the images `paths`: OBJECTS_PER_IMAGE star-shaped polygons per image."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id, path in enumerate(paths, 1):
        width, height = Image.open(path).size
        images.append({"id": image_id, "file_name": os.path.basename(path), "width": width, "height": height})
        for _ in range(OBJECTS_PER_IMAGE):
            centre = rng.uniform(0.2, 0.8, 2) * (width, height)
            angles = np.sort(rng.uniform(0, 2 * np.pi, POLYGON_POINTS))
            radii = rng.uniform(0.3, 1.0, POLYGON_POINTS) * rng.uniform(0.05, 0.2) * min(width, height)
            xs = np.clip(centre[0] + radii * np.cos(angles), 0, width)
            ys = np.clip(centre[1] + radii * np.sin(angles), 0, height)
            polygon = np.stack([xs, ys], 1).reshape(-1).round(2).tolist()
            x0, y0 = float(xs.min()), float(ys.min())
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 81)),
                "segmentation": [polygon], "bbox": [x0, y0, float(xs.max()) - x0, float(ys.max()) - y0],
                "area": 1.0, "iscrowd": 0,
            })  # fmt: skip
    categories = [{"id": c, "name": str(c)} for c in range(1, 81)]
    return {"images": images, "annotations": annotations, "categories": categories}


def stacked_masks(labels: list[dict], height: int, width: int) -> list[torch.Tensor]:
    """Each image's masks [M, height, width] bool from a processor's labels (padded to the batch)."""
    return [label["masks"].bool()[:, :height, :width] for label in labels]


def agree(ours: dict, theirs: dict, masks: list[torch.Tensor]) -> dict:
    """same_pixels / same_masks of one implementation's output against transformers'."""
    height, width = theirs["pixel_values"].shape[-2:]
    same_pixels = ours["pixel_values"].shape == theirs["pixel_values"].shape and torch.allclose(
        ours["pixel_values"], theirs["pixel_values"], atol=1e-5, rtol=0
    )
    reference = stacked_masks(theirs["labels"], height, width)
    same_masks = len(masks) == len(reference) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(masks, reference)
    )
    return {"same_pixels": bool(same_pixels), "same_masks": bool(same_masks)}


def compare(case: str, dataset, name: str, paths: list[str], call: dict, repeats: int, **options) -> list[dict]:
    """Rows of one case: the dataset's items collated (row `name`), and our and transformers' DetrImageProcessor
    (built with `options`, e.g. format) called on the decoded images with `call` (annotations, masks_path), each
    checked against transformers' output."""
    import transformers

    ours, theirs = DetrImageProcessor(**options), transformers.DetrImageProcessor(**options)

    def dataset_batch():
        return collate([dataset[i] for i in range(len(dataset))])

    def processor(impl):
        images = [Image.open(path).convert("RGB") for path in paths]
        return impl(images, return_segmentation_masks=True, return_tensors="pt", **call)

    reference = processor(theirs)
    height, width = reference["pixel_values"].shape[-2:]
    batch, processed = dataset_batch(), processor(ours)
    counts = batch["labels"]["mask"].sum(1).tolist()  # the real slots of each image, outside the timing
    batch_masks = [masks[:count, :height, :width] for masks, count in zip(batch["labels"]["masks"], counts)]
    checks = {
        name: agree(batch, reference, batch_masks),
        "detr_fast DetrImageProcessor": agree(processed, reference, stacked_masks(processed["labels"], height, width)),
        "transformers DetrImageProcessor": {"same_pixels": True, "same_masks": True},
    }
    fns = {
        name: dataset_batch,
        "detr_fast DetrImageProcessor": lambda: processor(ours),
        "transformers DetrImageProcessor": lambda: processor(theirs),
    }
    timings = common.time_all(fns, "cpu", repeats)
    return [{"case": case, "B": len(paths), "impl": impl, **t.columns(), "images_per_s": len(paths) / t.ms * 1e3,
             **checks[impl]} for impl, t in timings.items()]  # fmt: skip


def detection_rows(folder: str, paths: list[str], repeats: int) -> list[dict]:
    annotation_file = os.path.join(folder, "instances.json")
    instances = instance_annotations(paths)
    pathlib.Path(annotation_file).write_text(json.dumps(instances))
    dataset = CocoDetection(folder, annotation_file, eval_transforms(800, 1333), masks=True)
    per_image = [
        {"image_id": image["id"], "annotations": [a for a in instances["annotations"] if a["image_id"] == image["id"]]}
        for image in instances["images"]
    ]
    case = f"coco_detection, {OBJECTS_PER_IMAGE} polygon masks"
    return compare(case, dataset, "detr_fast CocoDetection", paths, {"annotations": per_image}, repeats)


def panoptic_rows(folder: str, count: int, repeats: int) -> list[dict]:
    spec = SyntheticSpec(min_size=375, max_size=640, min_objects=2, max_objects=8, min_object_fraction=0.1)
    image_dir, json_path, png_dir = write_coco_panoptic(folder, "val", count, seed=0, spec=spec)
    dataset = CocoPanoptic(image_dir, json_path, png_dir, eval_transforms(800, 1333))
    paths = [os.path.join(image_dir, image["file_name"]) for image in dataset.panoptic["images"]]
    call = {"annotations": dataset.panoptic["annotations"], "masks_path": png_dir}
    return compare("coco_panoptic, PNG segments", dataset, "detr_fast CocoPanoptic", paths, call, repeats,
                   format="coco_panoptic")  # fmt: skip


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    if args.device != "cpu":
        print("segmentation_data: a CPU benchmark (data loading); --device is ignored")
    repeats = args.repeats or (3 if args.quick else 5)
    count = 4 if args.quick else 8
    info = common.environment("cpu")
    with tempfile.TemporaryDirectory() as folder:
        rows = detection_rows(folder, jpegs(folder, count), repeats) + panoptic_rows(folder, count, repeats)
    common.record_end_load(info)
    lines = []
    for case, ours in (("coco_detection", "detr_fast CocoDetection"), ("coco_panoptic", "detr_fast CocoPanoptic")):
        case_rows = [row for row in rows if row["case"].startswith(case)]
        for impl in (ours, "detr_fast DetrImageProcessor"):
            row = common.row_of(case_rows, impl)
            same = row["same_masks"] and row["same_pixels"]
            lines.append(
                f"{'PASS' if same else 'FAIL'}: {case}, {impl}: "
                f"{common.row_of(case_rows, 'transformers DetrImageProcessor')['ms'] / row['ms']:.2f}x transformers' "
                f"images/s, {'the same' if same else 'NOT the same'} masks and pixels"
            )
    notes = "\n".join([TARGETS, "", *[f"- {line}" for line in lines]])
    common.write_results("segmentation_data", rows, info, args.out, notes)
    return common.report_targets(lines)


if __name__ == "__main__":
    sys.exit(main())
