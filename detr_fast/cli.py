"""`detr-fast train | eval | predict | demo | bench | convert`: the command-line entry points."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from PIL import Image

from .data.datasets import ON_BAD, CocoDetection, CocoPanoptic
from .data.transforms import eval_transforms
from .evaluate import evaluate, write_metrics
from .inference import Detector, coco_results, draw_detections, image_paths, load_model, predict_batch_size
from .model import DetrForSegmentation, DetrPreTrainedModel, architecture_of, model_class
from .model.weights import (
    LAYOUTS,
    from_detr_fast,
    infer_config,
    load_into,
    original_checkpoint,
    read_checkpoint,
    write_safetensors,
)
from .runtime import AMP_MODES, resolve_device
from .segmentation_metrics import PANOPTIC_THRESHOLD, PROCESSOR_THRESHOLD, evaluate_instances, evaluate_panoptic
from .train import PRESETS, preset, train
from .train.config import validate
from .train.data import build_datasets
from .train.options import add_train_options, train_config

# What a user can get wrong (a bad option, a missing or bad file): one line, no traceback (--debug shows it).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ImportError)


def train_command(args: argparse.Namespace) -> int:
    """Train DETR (a preset, adjusted by the options) and evaluate it; under torchrun, on every process."""
    cfg = train_config(args)
    validate(cfg)  # every bad choice fails here, before any data is built
    resume = args.resume
    if resume == "auto":
        resume = os.path.join(cfg.output_dir, "checkpoint.pt")
    if resume is not None and not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume: no checkpoint at {resume}; leave --resume out to start a new run")
    result = train(cfg, resume=resume, stop_after=args.stop_after)
    return 0 if result["steps"] == result["config"].steps or args.stop_after else 1


def demo(args: argparse.Namespace) -> int:
    """`train --preset synthetic` (or `synthetic-panoptic` with --task panoptic; a fixed number of steps, or a time
    budget when given), then the evaluation, and a short summary."""
    start = time.perf_counter()
    overrides = {
        k: v for k, v in (("seed", args.seed), ("output_dir", args.output_dir), ("steps", args.steps)) if v is not None
    }
    if args.time_budget is not None:  # the budget decides the step count
        overrides.update(time_budget=args.time_budget, steps=None)
    cfg = preset("synthetic-panoptic" if args.task == "panoptic" else "synthetic", **overrides)
    result = train(cfg)
    metrics = result["metrics"]
    print(
        f"detr_fast demo: {result['steps']} steps in {result['train_seconds'] / 60:.1f} min "
        f"({result['images_per_s']:.1f} images/s on {resolve_device('auto')}),"
        f" {time.perf_counter() - start:.0f} s in all"
    )
    if args.task == "panoptic":
        print(
            f"  synthetic panoptic validation set ({metrics['num_images']} images): PQ {metrics['pq']:.3f} "
            f"(things {metrics['pq_things']:.3f}, stuff {metrics['pq_stuff']:.3f}), SQ {metrics['sq']:.3f}, "
            f"RQ {metrics['rq']:.3f} (panopticapi's rules, segments above DETR's {PANOPTIC_THRESHOLD} class "
            f"probability); mask mAP {metrics['mask_map']:.3f}, mask mAP@0.5 {metrics['mask_map50']:.3f} (the "
            "things, pycocotools)"
        )
        # and at transformers' post-processing default: a briefly trained model's classes are right before they
        # are confident
        _, val_set = build_datasets(cfg)  # the run's validation set (the written data is reused, not rewritten)
        device = resolve_device(cfg.device)
        model = load_for_eval(os.path.join(cfg.output_dir, "model"))[0].to(device)
        batch_size = cfg.eval_batch_size or cfg.batch_size
        loose = evaluate_panoptic(
            model, val_set, batch_size, device, cfg.amp, PROCESSOR_THRESHOLD, num_workers=cfg.num_workers
        )
        path = os.path.join(cfg.output_dir, f"metrics-threshold-{PROCESSOR_THRESHOLD}.json")
        write_metrics({**loose, "threshold": PROCESSOR_THRESHOLD}, path)
        print(
            f"  at transformers' default threshold {PROCESSOR_THRESHOLD}: PQ {loose['pq']:.3f} (things "
            f"{loose['pq_things']:.3f}, stuff {loose['pq_stuff']:.3f}), SQ {loose['sq']:.3f}, RQ {loose['rq']:.3f} "
            f"({path})"
        )
        return 0
    print(
        f"  synthetic validation set ({metrics['num_images']} images): mAP {metrics['map']:.3f}, "
        f"mAP@0.5 {metrics['map50']:.3f} (pycocotools)"
    )
    return 0


def load_for_eval(path: str) -> tuple[DetrPreTrainedModel, dict]:
    """inference.load_model's model and its evaluation resize as {"size", "max_size"} ({} when none is
    recorded: the images as they are)."""
    model, processor = load_model(path)
    if processor is None:
        return model, {}
    if "shortest_edge" not in processor.size:
        raise ValueError(f"{path}: the evaluation resize {processor.size} is not {{shortest_edge, longest_edge}}")
    size = processor.size["shortest_edge"] if processor.do_resize else None
    return model, {"size": size, "max_size": processor.size.get("longest_edge") or 1333}


def eval_command(args: argparse.Namespace) -> int:
    """COCO box mAP of a model on a COCO-format set, with --masks also mask mAP, with --panoptic-pngs PQ instead
    (a segmentation model); writes the metrics as JSON."""
    if args.threshold is not None and not args.panoptic_pngs:
        raise ValueError("eval: --threshold applies to PQ (with --panoptic-pngs); box and mask mAP rank every query")
    threshold = PANOPTIC_THRESHOLD if args.threshold is None else args.threshold
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"eval: --threshold is a class probability in [0, 1], got {threshold}")
    model, resize = load_for_eval(args.model)
    if (args.masks or args.panoptic_pngs) and not isinstance(model, DetrForSegmentation):
        raise ValueError(
            f"{args.model} holds a {type(model).__name__}; mask mAP and PQ need a DetrForSegmentation checkpoint"
        )
    size = args.size if args.size is not None else resize.get("size")
    max_size = args.max_size or resize.get("max_size") or 1333
    device = resolve_device(args.device)
    transforms = eval_transforms(size, max_size) if size else None
    model = model.to(device)
    if args.panoptic_pngs:
        dataset = CocoPanoptic(args.images, args.annotations, args.panoptic_pngs, transforms, on_bad=args.on_bad)
        metrics = evaluate_panoptic(
            model, dataset, args.batch_size, device, args.amp, threshold, args.num_workers, masks=args.masks
        )  # with --masks the thing segments are the instances
        metrics["threshold"] = threshold
        masks = f", mask mAP {metrics['mask_map']:.3f} (things)" if args.masks else ""
        write_metrics(metrics, args.out)
        print(
            f"PQ {metrics['pq']:.3f} (things {metrics['pq_things']:.3f}, stuff {metrics['pq_stuff']:.3f}), "
            f"SQ {metrics['sq']:.3f}, RQ {metrics['rq']:.3f} (threshold {threshold}){masks} on "
            f"{metrics['num_images']} images; wrote {args.out}"
        )
        return 0
    dataset = CocoDetection(args.images, args.annotations, transforms, on_bad=args.on_bad, masks=args.masks)
    metrics = evaluate(model, dataset, args.batch_size, device, args.amp, args.num_workers, verbose=True)
    masks = ""
    if args.masks:
        metrics.update(evaluate_instances(model, dataset, args.batch_size, device, args.amp, args.num_workers))
        masks = f", mask mAP {metrics['mask_map']:.3f}"
    write_metrics(metrics, args.out)
    skipped = f" ({metrics['num_skipped']} unreadable image(s) skipped)" if metrics["num_skipped"] else ""
    print(
        f"mAP {metrics['map']:.3f}, mAP@0.5 {metrics['map50']:.3f}{masks} on {metrics['num_images']} images"
        f"{skipped}; wrote {args.out}"
    )
    return 0


def predict(args: argparse.Namespace) -> int:
    """Detect objects in an image or the images of a folder: detections.json (COCO results, the images' pixels) and
    each image with its boxes drawn, in --out."""
    paths = image_paths(args.images)
    detector = Detector(*load_model(args.checkpoint), device=args.device, amp=args.amp)
    os.makedirs(args.out, exist_ok=True)
    results, start, done = [], time.perf_counter(), 0
    for chosen in detector.batches(paths, args.batch_size or predict_batch_size(detector.device)):
        batch = [paths[i] for i in chosen]
        for path, detections in zip(batch, detector.detect_batch(batch, args.threshold)):
            name = os.path.basename(path)
            results += [{**r, "file_name": name} for r in coco_results(detections, os.path.splitext(name)[0])]
            if not args.no_draw:
                draw_detections(Image.open(path), detections).save(os.path.join(args.out, f"{name}.detections.png"))
        done += len(batch)
        rate = done / (time.perf_counter() - start)
        print(f"\r[{'#' * (20 * done // len(paths)):<20}] {done}/{len(paths)} images, {rate:.1f} images/s", end="")
    print()
    with open(os.path.join(args.out, "detections.json"), "w") as f:
        json.dump(results, f, indent=1)
    drawn = "" if args.no_draw else ", and each image with its boxes as <name>.detections.png"
    print(f"{len(results)} detection(s) above {args.threshold} in {len(paths)} image(s); wrote "
          f"{os.path.join(args.out, 'detections.json')}{drawn}")  # fmt: skip
    return 0


def convert(args: argparse.Namespace) -> int:
    """Convert a checkpoint between detr_fast, transformers (v4/v5 keys) and facebookresearch/detr layouts."""
    state_dict, config = read_checkpoint(args.src)
    config = config or infer_config(state_dict)  # warns about what the weights do not record
    if args.layout == "detr_fast":
        model = model_class(architecture_of(config, state_dict)).for_weights(config)
        load_into(model, state_dict, args.src)
        model.save_pretrained(args.dst)
    elif args.layout == "original":
        os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
        torch.save(original_checkpoint(state_dict, config), args.dst)
    else:
        write_safetensors(os.path.join(args.dst, "model.safetensors"), from_detr_fast(state_dict, args.layout))
        config.to_transformers().to_json_file(os.path.join(args.dst, "config.json"))
    print(f"wrote {args.dst} ({args.layout}, {len(state_dict)} tensors)")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite of the source checkout (bench/suite.py) in a child process."""
    suite = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "suite.py")
    if not os.path.exists(suite):
        raise SystemExit(f"bench: {suite} not found; the benchmarks ship with the source checkout (pip install -e .)")
    command = [sys.executable, suite, "--out", args.out] + (["--quick"] if args.quick else [])
    if args.device:
        command += ["--device", args.device]
    if args.repeats:
        command += ["--repeats", str(args.repeats)]
    if args.only:
        command += ["--only", *args.only]
    return subprocess.call(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")

    p = commands.add_parser(
        "train",
        parents=[common],
        help="train DETR (single process, or every process under torchrun)",
        description="Train DETR from a preset (--preset), changed by the options given. Your own COCO-format data, "
        "offline: --preset coco-r50 --no-pretrained-backbone --train-images DIR --train-annotations JSON "
        "--val-images DIR --val-annotations JSON. Fine-tuning: add --init-from CHECKPOINT.",
    )
    add_train_options(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="continue the run of this checkpoint exactly (default <output-dir>/checkpoint.pt; it must exist)",
    )
    p.add_argument(
        "--stop-after", type=int, default=None, help="stop after this step, with a checkpoint (default: run to the end)"
    )
    p.set_defaults(run=train_command)

    p = commands.add_parser(
        "eval", parents=[common], help="COCO box (and mask) mAP, or panoptic quality, of a model on a COCO-format set"
    )
    p.add_argument("model", help="a training checkpoint (checkpoint.pt) or a model directory / weights file")
    p.add_argument("--images", required=True, help="folder of the images")
    p.add_argument("--annotations", required=True, help="COCO instances JSON")
    p.add_argument("--size", type=int, default=None, help="resize the shorter side (default: the run's, else none)")
    p.add_argument("--max-size", type=int, default=None, help="longest side after the resize (default: the run's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading worker processes (default: 2)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda' (default: auto)")
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help="mixed precision (default: auto, bf16 on CUDA)")
    p.add_argument(
        "--on-bad", choices=ON_BAD, default="raise", help="skip unreadable images instead of stopping (default: raise)"
    )
    p.add_argument("--out", default="metrics.json", help="where the metrics JSON goes (default: metrics.json)")
    p.add_argument(
        "--masks",
        action="store_true",
        help="also mask mAP (a segmentation model; annotations with segmentations, or with --panoptic-pngs the "
        "thing segments)",
    )
    p.add_argument(
        "--panoptic-pngs",
        default=None,
        help="PQ instead of mAP: --annotations is a COCO panoptic JSON and this the folder of its PNGs",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=f"with --panoptic-pngs: the class probability a query needs to be a segment (default: DETR's "
        f"{PANOPTIC_THRESHOLD}; transformers' post-processing defaults to {PROCESSOR_THRESHOLD})",
    )
    p.set_defaults(run=eval_command)

    p = commands.add_parser("demo", parents=[common], help="train on the built-in synthetic shapes, then evaluate")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's, 42)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (default: the preset's, {PRESETS['synthetic']['steps']}; "
        f"{PRESETS['synthetic-panoptic']['steps']} with --task panoptic)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds of training instead of a step count (the result then depends on the machine's speed)",
    )
    p.add_argument(
        "--output-dir", default=None, help="where the run is written (default: runs/demo, runs/demo-panoptic)"
    )
    p.add_argument(
        "--task",
        choices=("detection", "panoptic"),
        default="detection",
        help="detection (boxes, the default) or panoptic (things and stuff, scored by PQ)",
    )
    p.set_defaults(run=demo)

    p = commands.add_parser(
        "bench", parents=[common], help="run the benchmark suite (every op and the training step vs their peers)"
    )
    p.add_argument("--quick", action="store_true", help="small grids: about a minute per benchmark on a CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--out",
        default="bench-results",
        help="folder for the results and their index (default: bench-results in the current directory; the "
        "repository's recorded runs are bench/results)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default: 7, quick 3)")
    p.add_argument("--only", nargs="*", default=None, help="benchmark names (linear_assignment, box_ops, ...)")
    p.set_defaults(run=bench)

    p = commands.add_parser("predict", parents=[common], help="detect objects in images with a trained model")
    p.add_argument("images", help="an image file, or a folder of images")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a model directory (ours or transformers', with its preprocessor_config.json) or a training checkpoint",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="keep detections scoring above this (default: 0.5)")
    p.add_argument(
        "--out", default="predictions", help="folder for detections.json and the pictures (default: predictions)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per forward pass (default: 1 on the CPU, 8 on a GPU)"
    )
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda' (default: auto)")
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help="mixed precision (default: auto, bf16 on CUDA)")
    p.add_argument("--no-draw", action="store_true", help="write detections.json only, no pictures")
    p.set_defaults(run=predict)

    p = commands.add_parser("convert", parents=[common], help="convert a checkpoint between weight layouts")
    p.add_argument("src", help="checkpoint file or directory (detr_fast, transformers v4/v5, or original DETR .pth)")
    p.add_argument("dst", help="output directory (detr_fast, transformers) or .pth file (original)")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="detr_fast",
        help="target layout (transformers-v4 keys; detr_fast is also transformers v5's)",
    )
    p.set_defaults(run=convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"detr-fast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
