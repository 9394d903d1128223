"""The configuration of a training run (`TrainConfig`) and its presets."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.datasets import ON_BAD
from ..model import ARCHITECTURES
from ..runtime import AMP_MODES

COCO_SCALES = tuple(range(480, 801, 32))
TASKS = ("detection", "instance", "panoptic")


@dataclass
class TrainConfig:
    """Everything that defines a training run. `model` holds DetrConfig fields (num_labels and id2label come from
    the dataset)."""

    # what the model learns: "detection" (boxes), "instance" (boxes and masks: COCO annotations with segmentations)
    # or "panoptic" (things and stuff: COCO panoptic JSONs and PNGs); the last two train a DetrForSegmentation
    task: str = "detection"
    # data: "synthetic" generates the built-in set under data_dir; "coco" reads the paths below
    dataset: str = "synthetic"
    data_dir: str | None = None  # default <output_dir>/data for the synthetic set
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    train_panoptic_pngs: str | None = None  # task "panoptic": the folders of the annotations' PNGs
    val_panoptic_pngs: str | None = None
    synthetic_train_images: int = 4000
    synthetic_val_images: int = 200
    synthetic_spec: dict = field(default_factory=dict)  # SyntheticSpec fields
    on_bad: str = "raise"  # or "skip": leave out (and count) images with bad annotations or unreadable files
    # augmentation (detr_fast.data.transforms); empty scales: no resize
    scales: tuple[int, ...] = COCO_SCALES
    max_size: int = 1333
    crop_resize: tuple[int, ...] | None = (400, 500, 600)
    crop_size: tuple[int, int] | None = (384, 600)
    flip: float = 0.5
    eval_size: int | None = 800
    eval_max_size: int = 1333
    max_targets: int | None = None  # pad targets to this many slots (fixed shapes); default the batch maximum
    # model: the class (a name of detr_fast.model.ARCHITECTURES) and its DetrConfig fields
    architecture: str = "DetrForObjectDetection"
    model: dict = field(default_factory=dict)
    init_from: str | None = None  # a trained checkpoint whose fitting weights start the run (fine-tuning)
    freeze_detector: str | None = None  # a trained detector: loaded and frozen, only the mask head trains
    # Also train the ResNet stem and layer1, which DETR freezes: a randomly initialized backbone must learn them.
    train_backbone_stem: bool = False
    # optimization
    batch_size: int = 4  # per process
    lr: float = 1e-4
    lr_backbone_multiplier: float = 0.1
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    warmup_steps: int = 0
    lr_drop: float = 0.8  # fraction of the steps after which the learning rate is multiplied by lr_drop_factor
    lr_drop_factor: float = 0.1
    steps: int | None = None  # total optimizer steps; else from epochs, else from time_budget
    epochs: float | None = None
    time_budget: float | None = None  # seconds of training: the step count is set halfway from the speed so far
    calibration_steps: int = 10  # warm-up steps left out of the speed measurement
    amp: str = "auto"  # "auto": bf16 autocast on CUDA, none on CPU; "bf16"; "off"
    compile: bool = False
    # runtime
    device: str = "auto"
    num_workers: int = 2
    threads: int | None = None  # torch's CPU threads; None: the cores not busy with other work (runtime.py)
    seed: int = 42
    log_every: int = 20
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    evaluate: bool = True  # False: no COCO evaluation at all (and no pycocotools needed)
    eval_batch_size: int | None = None
    checkpoint_every: int = 500
    output_dir: str = "runs/train"


# One line of help per field, for `detr-fast train --help` (tests/test_cli.py checks that every option has one).
HELP = {
    "task": "'detection' (boxes), 'instance' (boxes and masks) or 'panoptic' (things and stuff); the last two train "
    "a DetrForSegmentation",
    "dataset": "'synthetic' generates the built-in shapes under --data-dir; 'coco' reads --train-images and "
    "--train-annotations (and the --val-* pair to evaluate)",
    "data_dir": "folder of the synthetic set (none: <output-dir>/data)",
    "train_images": "folder of the training images (dataset 'coco')",
    "train_annotations": "COCO instances JSON of the training images",
    "val_images": "folder of the validation images (needed only to evaluate)",
    "val_annotations": "COCO instances JSON of the validation images (task 'panoptic': COCO panoptic JSONs)",
    "train_panoptic_pngs": "task 'panoptic' on dataset 'coco': the folder of the training annotations' PNGs",
    "val_panoptic_pngs": "task 'panoptic' on dataset 'coco': the folder of the validation annotations' PNGs",
    "synthetic_train_images": "training images of the synthetic set",
    "synthetic_val_images": "validation images of the synthetic set",
    "on_bad": "'raise' stops at the first bad annotation or unreadable image; 'skip' leaves it out and counts it",
    "scales": "training resize: the shorter side becomes one of these (random per image); 'none': no resize",
    "max_size": "longest side after the training resize",
    "crop_resize": "with random cropping: resize to one of these shorter sides before the crop ('none': no resize)",
    "crop_size": "random crop: MIN MAX side in pixels, applied to half the images ('none': no cropping)",
    "flip": "probability of a horizontal flip",
    "eval_size": "evaluation resize of the shorter side ('none': images as they are)",
    "eval_max_size": "longest side after the evaluation resize",
    "max_targets": "pad targets to this many slots per image (fixed shapes across steps; default: the batch's most)",
    "architecture": "the model class",
    "init_from": "start from the weights of this checkpoint where they fit (detr_fast, transformers or original "
    "DETR; a differing label set re-initializes the class head): fine-tuning",
    "freeze_detector": "a trained detector checkpoint: its weights start the detector, which stays frozen while the "
    "mask head trains (DETR's two-step recipe; tasks 'instance' and 'panoptic')",
    "train_backbone_stem": "also train the ResNet stem and layer1, which DETR freezes (needed from random weights)",
    "batch_size": "images per step and process",
    "lr": "learning rate (AdamW)",
    "lr_backbone_multiplier": "the backbone's learning rate is lr times this (0 freezes it)",
    "weight_decay": "AdamW weight decay",
    "clip_max_norm": "gradient clipping by global norm (0: none)",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "lr_drop": "fraction of the steps after which the learning rate drops",
    "lr_drop_factor": "the learning rate is multiplied by this at the drop",
    "steps": "optimizer steps of the run (else from --epochs, else from --time-budget)",
    "epochs": "length of the run in epochs of the training set",
    "time_budget": "seconds of training: the step count is set from the speed of the first half (machine-dependent)",
    "calibration_steps": "steps left out of the speed measurement of --time-budget",
    "amp": "mixed precision: 'auto' is bf16 autocast on CUDA and fp32 on the CPU; 'bf16'; 'off' (fp32, the paper's)",
    "compile": "torch.compile the training step",
    "device": "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'",
    "num_workers": "data-loading worker processes",
    "threads": "torch CPU threads (default: the cores not busy with other work, measured at the start)",
    "seed": "random seed of the weights, the data order and the augmentation",
    "log_every": "steps between log lines",
    "eval_every": "steps between evaluations (0: only at the end)",
    "evaluate": "evaluate with pycocotools at the end (--no-evaluate: no validation set or pycocotools needed)",
    "eval_batch_size": "images per evaluation batch (default --batch-size)",
    "checkpoint_every": "steps between checkpoints",
    "output_dir": "where the checkpoint, the model, metrics, history and plots go",
}

# Fields that do not change what the run computes; a resumed run may set them differently.
RUNTIME_FIELDS = {
    "num_workers",
    "threads",
    "log_every",
    "eval_every",
    "evaluate",
    "eval_batch_size",
    "checkpoint_every",
    "output_dir",
    "compile",
    "device",
    "data_dir",
    "time_budget",
    "calibration_steps",
}

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's DETR-R50 on COCO: 500 epochs, LR drop at 400, batch 64 overall (4 per GPU on 16 GPUs).
    "coco-r50": dict(
        dataset="coco",
        batch_size=4,
        lr=1e-4,
        lr_backbone_multiplier=0.1,
        weight_decay=1e-4,
        clip_max_norm=0.1,
        epochs=500,
        lr_drop=0.8,
        num_workers=4,
        log_every=50,
        checkpoint_every=2000,
        model=dict(backbone="resnet50", auxiliary_loss=True, use_pretrained_backbone=True),
    ),
    # The built-in synthetic shapes, sized so that DETR learns them from random weights in a few minutes on a
    # 2-core CPU. A fixed step count, not a time budget: the same seed gives the same model on any machine, however
    # busy. What it takes (bench/results/demo-*.md has the measurements): a GroupNorm backbone
    # (trainable normalization, the DETR authors' from-scratch recipe: the frozen BatchNorm of a random
    # initialization is the identity), trained from the stem on (train_backbone_stem); small 32-pixel images read
    # at stride 4 (ResNet-18 up to layer1: 8x8 tokens), so a step is cheap; batches of 32 (at 8 or 16 DETR stayed
    # far longer on its "mean box" plateau); 6 queries for at most 4 objects; no dropout.
    "synthetic": dict(
        dataset="synthetic",
        synthetic_train_images=8000,
        synthetic_val_images=200,
        synthetic_spec=dict(
            min_size=32, max_size=32, min_objects=1, max_objects=4, min_object_fraction=0.3, max_object_fraction=0.6
        ),
        scales=(),
        crop_resize=None,
        crop_size=None,
        flip=0.5,
        eval_size=None,
        max_targets=4,
        model=dict(
            backbone="resnet18",
            backbone_kwargs={"out_indices": [1], "norm_layer": "groupnorm"},
            d_model=128,
            encoder_layers=2,
            decoder_layers=3,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=512,
            decoder_ffn_dim=512,
            num_queries=6,
            dropout=0.0,
            auxiliary_loss=True,
        ),
        train_backbone_stem=True,
        batch_size=32,
        lr=2e-4,
        lr_backbone_multiplier=1.0,
        weight_decay=1e-4,
        clip_max_norm=0.1,
        warmup_steps=100,
        lr_drop=0.7,
        steps=3600,
        num_workers=0,
        # A fixed thread count, not the free cores: another count rounds the reductions differently, and the demo
        # must give the same model every time.
        threads=2,
        log_every=100,
        eval_every=500,
        checkpoint_every=500,
        output_dir="runs/demo",
    ),
}


# The synthetic panoptic set (the shapes over two or three textured stuff bands), for `detr-fast demo --task
# panoptic`: the synthetic preset's recipe on 64-pixel images, with the four backbone levels the mask head reads taken
# one stride earlier (strides 2 to 16: the transformer gets 4x4 tokens, the masks 32x32 cells), 8 queries for up to
# 3 things and 3 stuff segments, batches of 16 (the masks cost most of a step), 4800 steps: about ten minutes on the
# development CPU. The things are localized long before they are classified; a learning rate of 3e-4 held until 95 %
# of the steps is what makes them confident in that time (bench/results/demo-panoptic-cpu-2026-12-08.md: with the
# detection preset's 2e-4 dropped at 70 %, PQ 0.32 instead of 0.57; 4e-4 did worse).
PRESETS["synthetic-panoptic"] = {
    **PRESETS["synthetic"],
    "task": "panoptic",
    "synthetic_train_images": 4000,
    "synthetic_val_images": 100,
    "synthetic_spec": dict(
        min_size=64, max_size=64, min_objects=1, max_objects=3, min_object_fraction=0.3, max_object_fraction=0.6
    ),
    "max_targets": 6,
    "model": {
        **PRESETS["synthetic"]["model"],
        "backbone_kwargs": {"out_indices": [0, 1, 2, 3], "norm_layer": "groupnorm"},
        "encoder_attention_heads": 8,  # the mask head's width d_model + heads must be divisible by 8
        "decoder_attention_heads": 8,
        "num_queries": 8,
    },
    "batch_size": 16,
    "lr": 3e-4,
    "lr_drop": 0.95,
    "steps": 4800,
    "log_every": 50,
    "eval_every": 1600,
    "output_dir": "runs/demo-panoptic",
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """The TrainConfig of preset `name` with `overrides` applied (model fields merge into the preset's model)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values = {**PRESETS[name]}
    model = {**values.get("model", {}), **overrides.pop("model", {})}
    values.update(overrides)
    values["model"] = model
    return TrainConfig(**values)


def model_architecture(cfg: TrainConfig) -> str:
    """The model class of a run: DetrForSegmentation for the segmentation tasks, else cfg.architecture."""
    return "DetrForSegmentation" if cfg.task != "detection" else cfg.architecture


def _positive(cfg: TrainConfig, names: tuple[str, ...], allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not (value >= 0 if allow_zero else value > 0):
            raise ValueError(f"{name.replace('_', '-')} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


def validate(cfg: TrainConfig) -> None:
    """Check a run's configuration before any work: ValueError naming the option and what it got."""
    choices = {
        "task": TASKS,
        "dataset": ("synthetic", "coco"),
        "amp": AMP_MODES,
        "on_bad": ON_BAD,
        "architecture": ARCHITECTURES,
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(
                f"{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}"
            )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r}, but torch sees no CUDA device; use --device cpu")
    _positive(cfg, ("batch_size", "steps", "epochs", "time_budget", "lr", "log_every", "checkpoint_every", "threads"))
    _positive(cfg, ("max_targets", "eval_batch_size", "max_size", "eval_max_size", "eval_size", "lr_drop_factor"))
    _positive(cfg, ("num_workers", "eval_every", "warmup_steps", "clip_max_norm", "weight_decay"), allow_zero=True)
    _positive(cfg, ("lr_backbone_multiplier", "calibration_steps"), allow_zero=True)
    if not 0 < cfg.lr_drop <= 1:
        raise ValueError(f"lr-drop is the fraction of the steps before the drop, in (0, 1], got {cfg.lr_drop}")
    if not 0 <= cfg.flip <= 1:
        raise ValueError(f"flip is a probability, got {cfg.flip}")
    for name in ("scales", "crop_resize"):
        if any(size <= 0 for size in getattr(cfg, name) or ()):
            raise ValueError(f"{name.replace('_', '-')} must be positive sizes, got {getattr(cfg, name)}")
    if cfg.crop_size is not None and not (len(cfg.crop_size) == 2 and 0 < cfg.crop_size[0] <= cfg.crop_size[1]):
        raise ValueError(f"crop-size is MIN MAX with 0 < MIN <= MAX, got {cfg.crop_size}")
    if cfg.architecture == "DetrForSegmentation" and cfg.task == "detection":
        raise ValueError("architecture DetrForSegmentation learns masks: give --task instance or --task panoptic")
    if cfg.freeze_detector is not None:
        if cfg.task == "detection":
            raise ValueError("--freeze-detector trains a mask head on a detector: give --task instance or panoptic")
        if not os.path.exists(cfg.freeze_detector):
            raise ValueError(f"--freeze-detector: no such checkpoint: {cfg.freeze_detector}")
    names = ["train_images", "train_annotations", "val_images", "val_annotations"]
    if cfg.task == "panoptic":
        names += ["train_panoptic_pngs", "val_panoptic_pngs"]
    paths = {name: getattr(cfg, name) for name in names}
    if cfg.dataset == "synthetic" and cfg.task == "instance":
        raise ValueError("the synthetic set has no instance masks: give --task panoptic, or --dataset coco")
    if cfg.dataset == "synthetic":
        given = [f"--{name.replace('_', '-')}" for name, path in paths.items() if path]
        if given:
            raise ValueError(
                f"{' and '.join(given)} given, but dataset 'synthetic' generates its own images and would ignore "
                "them: add --dataset coco to train on your data (the preset's model and schedule stay)"
            )
        return
    required = ["train_images", "train_annotations"] + (["val_images", "val_annotations"] if cfg.evaluate else [])
    if cfg.task == "panoptic":
        required += ["train_panoptic_pngs"] + (["val_panoptic_pngs"] if cfg.evaluate else [])
    missing = [f"--{name.replace('_', '-')}" for name in required if not paths[name]]
    if missing:
        hint = "; or --no-evaluate to train without a validation set" if cfg.evaluate else ""
        raise ValueError(f"dataset 'coco' needs {', '.join(missing)}{hint}")
    for name, path in paths.items():
        folder = name.endswith(("images", "pngs"))
        if path and not (os.path.isdir(path) if folder else os.path.isfile(path)):
            kind = "folder" if folder else "file"
            raise ValueError(f"--{name.replace('_', '-')}: no such {kind}: {path}")
