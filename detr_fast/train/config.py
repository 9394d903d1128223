"""The configuration of a training run (`TrainConfig`) and its presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

COCO_SCALES = tuple(range(480, 801, 32))


@dataclass
class TrainConfig:
    """Everything that defines a training run. `model` holds DetrConfig fields (num_labels and id2label come from
    the dataset)."""

    # data: "synthetic" generates the built-in set under data_dir; "coco" reads the four paths below
    dataset: str = "synthetic"
    data_dir: str | None = None  # default <output_dir>/data for the synthetic set
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
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
    threads: int | None = None
    seed: int = 42
    log_every: int = 20
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    evaluate: bool = True  # False: no COCO evaluation at all (and no pycocotools needed)
    eval_batch_size: int | None = None
    checkpoint_every: int = 500
    output_dir: str = "runs/train"


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
        log_every=100,
        eval_every=500,
        checkpoint_every=500,
        output_dir="runs/demo",
    ),
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
