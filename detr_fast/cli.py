"""`detr-fast train | eval | demo | bench | convert`: the command-line entry points."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from .data.datasets import ON_BAD, CocoDetection
from .data.transforms import eval_transforms
from .evaluate import evaluate, write_metrics
from .model import DetrConfig, DetrPreTrainedModel, architecture_of, model_class
from .model.weights import LAYOUTS, from_detr_fast, load_into, read_checkpoint, write_safetensors
from .runtime import resolve_device
from .train import PRESETS, NotATrainingCheckpoint, TrainConfig, load_checkpoint, preset, train

# Command-line options of `train` that set TrainConfig fields and DetrConfig fields, with their types.
TRAIN_OPTIONS = {
    "steps": int,
    "epochs": float,
    "time_budget": float,
    "batch_size": int,
    "lr": float,
    "lr_backbone_multiplier": float,
    "weight_decay": float,
    "clip_max_norm": float,
    "warmup_steps": int,
    "amp": str,
    "device": str,
    "num_workers": int,
    "threads": int,
    "seed": int,
    "log_every": int,
    "eval_every": int,
    "evaluate": bool,
    "checkpoint_every": int,
    "output_dir": str,
    "data_dir": str,
    "train_images": str,
    "train_annotations": str,
    "val_images": str,
    "val_annotations": str,
    "on_bad": str,
}
MODEL_OPTIONS = {"backbone": str, "num_queries": int, "d_model": int, "auxiliary_loss": bool}


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The preset with the options given on the command line applied."""
    overrides = {name: getattr(args, name) for name in TRAIN_OPTIONS if getattr(args, name, None) is not None}
    model = {name: getattr(args, name) for name in MODEL_OPTIONS if getattr(args, name, None) is not None}
    if args.compile:
        overrides["compile"] = True
    return preset(args.preset, model=model, **overrides)


def train_command(args: argparse.Namespace) -> int:
    """Train DETR (a preset, adjusted by the options) and evaluate it; under torchrun, on every process."""
    result = train(train_config(args), resume=args.resume, stop_after=args.stop_after)
    return 0 if result["steps"] == result["config"].steps or args.stop_after else 1


def demo(args: argparse.Namespace) -> int:
    """`train --preset synthetic` (a fixed number of steps, or a time budget when given), then the evaluation, and a
    short summary."""
    start = time.perf_counter()
    overrides = {
        k: v for k, v in (("seed", args.seed), ("output_dir", args.output_dir), ("steps", args.steps)) if v is not None
    }
    if args.time_budget is not None:  # the budget decides the step count
        overrides.update(time_budget=args.time_budget, steps=None)
    cfg = preset("synthetic", **overrides)
    result = train(cfg)
    metrics = result["metrics"]
    print(
        f"detr_fast demo: {result['steps']} steps in {result['train_seconds'] / 60:.1f} min "
        f"({result['images_per_s']:.1f} images/s on {resolve_device('auto')}),"
        f" {time.perf_counter() - start:.0f} s in all"
    )
    print(
        f"  synthetic validation set ({metrics['num_images']} images): mAP {metrics['map']:.3f}, "
        f"mAP@0.5 {metrics['map50']:.3f} (pycocotools)"
    )
    print(f"  wrote {cfg.output_dir}/: metrics.json, curves.png, detections.png, checkpoint.pt, model/")
    return 0


def load_for_eval(path: str) -> tuple[DetrPreTrainedModel, dict]:
    """A model from a training checkpoint (its run's model class, with the run's evaluation resize) or from anything
    from_pretrained reads (the class its config.json names, else the detector)."""
    if os.path.isfile(path):
        try:
            state = load_checkpoint(path)  # a training checkpoint of another version or incomplete: its error
        except NotATrainingCheckpoint:
            state = None  # a weights file for from_pretrained
        if state is not None:
            cls = model_class(state["config"]["architecture"])
            model = cls.for_weights(DetrConfig.from_dict(state["model_config"]))
            load_into(model, state["model"], path)
            return model, {"size": state["config"]["eval_size"], "max_size": state["config"]["eval_max_size"]}
    return model_class(architecture_of(read_checkpoint(path)[1])).from_pretrained(path), {}


def eval_command(args: argparse.Namespace) -> int:
    """COCO mAP of a model on a COCO-format set; writes the metrics as JSON."""
    model, resize = load_for_eval(args.model)
    size = args.size if args.size is not None else resize.get("size")
    max_size = args.max_size or resize.get("max_size") or 1333
    device = resolve_device(args.device)
    transforms = eval_transforms(size, max_size) if size else None
    dataset = CocoDetection(args.images, args.annotations, transforms, on_bad=args.on_bad)
    metrics = evaluate(model.to(device), dataset, args.batch_size, device, args.amp, args.num_workers, verbose=True)
    write_metrics(metrics, args.out)
    print(
        f"mAP {metrics['map']:.3f}, mAP@0.5 {metrics['map50']:.3f} on {metrics['num_images']} images; wrote {args.out}"
    )
    return 0


def convert(args: argparse.Namespace) -> int:
    """Convert a checkpoint between detr_fast, transformers (v4/v5 keys) and facebookresearch/detr layouts."""
    state_dict, config = read_checkpoint(args.src)
    if args.layout == "detr_fast":
        if config is None:
            raise SystemExit(
                f"convert: {args.src} stores no config to write beside the weights; give a directory with config.json"
            )
        model = model_class(architecture_of(config)).for_weights(config)
        load_into(model, state_dict, args.src)
        model.save_pretrained(args.dst)
    elif args.layout == "original":
        torch.save({"model": from_detr_fast(state_dict, "original")}, args.dst)
    else:
        write_safetensors(os.path.join(args.dst, "model.safetensors"), from_detr_fast(state_dict, args.layout))
        if config is not None:
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

    p = commands.add_parser("train", help="train DETR (single process, or every process under torchrun)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="synthetic")
    for name, kind in {**TRAIN_OPTIONS, **MODEL_OPTIONS}.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type=kind, default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue from a checkpoint (default <output-dir>/checkpoint.pt)",
    )
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step (a checkpoint is written)")
    p.set_defaults(run=train_command)

    p = commands.add_parser("eval", help="COCO mAP of a model on a COCO-format set")
    p.add_argument("model", help="a training checkpoint (checkpoint.pt) or a model directory / weights file")
    p.add_argument("--images", required=True, help="folder of the images")
    p.add_argument("--annotations", required=True, help="COCO instances JSON")
    p.add_argument("--size", type=int, default=None, help="resize the shorter side (default: the run's, else none)")
    p.add_argument("--max-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto")
    p.add_argument("--on-bad", choices=ON_BAD, default="raise")
    p.add_argument("--out", default="metrics.json", help="where the metrics JSON goes")
    p.set_defaults(run=eval_command)

    p = commands.add_parser("demo", help="train on the built-in synthetic shapes, then evaluate")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="training steps (default the preset's, 3600)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds of training instead of a step count (the result then depends on the machine's speed)",
    )
    p.add_argument("--output-dir", default=None)
    p.set_defaults(run=demo)

    p = commands.add_parser("bench", help="run the benchmark suite (every op and the training step vs their peers)")
    p.add_argument("--quick", action="store_true", help="small grids: about a minute per benchmark on a CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="folder for the results and their index")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--only", nargs="*", default=None, help="benchmark names (linear_assignment, box_ops, ...)")
    p.set_defaults(run=bench)

    p = commands.add_parser("convert", help="convert a checkpoint between weight layouts")
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
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
