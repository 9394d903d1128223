"""Training: `detr-fast train`. One readable loop for a single process and for torchrun DDP.

    batch -> model(pixel_values, pixel_mask, labels=padded targets) -> loss -> backward -> clip -> AdamW -> LR step

The step between the forward pass and backward() has no host sync: the targets are padded (fixed shapes), the
losses and the matcher status are accumulated on the device and read only every `log_every` steps. Checkpoints are
written atomically (temporary file + os.replace) and hold everything a resumed run needs to continue as if it had
never stopped: weights, optimizer, scheduler, RNG states, step, the run's config and its history. The batches of
step s are a function of (seed, s) alone, so a resumed run sees exactly the batches the uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .data.collate import collate
from .data.datasets import CocoDetection
from .data.synthetic import SyntheticSpec, write_coco
from .data.transforms import eval_transforms, train_transforms
from .evaluate import autocast_dtype, evaluate, write_metrics
from .model import DetrConfig, DetrForObjectDetection
from .model.weights import load_into

CHECKPOINT_FORMAT = "detr_fast-train-2"  # 2: one RNG state per process, the sampler position
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
    # model
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
RUNTIME_FIELDS = {"num_workers", "threads", "log_every", "eval_every", "evaluate", "eval_batch_size",
                  "checkpoint_every", "output_dir", "compile", "device", "data_dir", "time_budget", "calibration_steps"}

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's DETR-R50 on COCO: 500 epochs, LR drop at 400, batch 64 overall (4 per GPU on 16 GPUs).
    "coco-r50": dict(
        dataset="coco", batch_size=4, lr=1e-4, lr_backbone_multiplier=0.1, weight_decay=1e-4, clip_max_norm=0.1,
        epochs=500, lr_drop=0.8, num_workers=4, log_every=50, checkpoint_every=2000,
        model=dict(backbone="resnet50", auxiliary_loss=True, use_pretrained_backbone=True),
    ),
    # The built-in synthetic shapes, sized so that DETR learns them from random weights in ~7 minutes on a 2-core
    # CPU (measured: mAP@0.5 0.50 after 2000 steps, 0.70 after 3000). What it takes: a GroupNorm backbone
    # (trainable normalization, the DETR authors' from-scratch recipe: the frozen BatchNorm of a random
    # initialization is the identity), trained from the stem on (train_backbone_stem); small 32-pixel images read
    # at stride 4 (ResNet-18 up to layer1: 8x8 tokens), so a step is cheap; batches of 32 (at 8 or 16 DETR stayed
    # far longer on its "mean box" plateau); 6 queries for at most 4 objects; no dropout.
    "synthetic": dict(
        dataset="synthetic", synthetic_train_images=8000, synthetic_val_images=200,
        synthetic_spec=dict(min_size=32, max_size=32, min_objects=1, max_objects=4, min_object_fraction=0.3,
                            max_object_fraction=0.6),
        scales=(), crop_resize=None, crop_size=None, flip=0.5, eval_size=None, max_targets=4,
        model=dict(backbone="resnet18", backbone_kwargs={"out_indices": [1], "norm_layer": "groupnorm"},
                   d_model=128, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512, num_queries=6,
                   dropout=0.0, auxiliary_loss=True),
        train_backbone_stem=True, batch_size=32, lr=2e-4, lr_backbone_multiplier=1.0, weight_decay=1e-4,
        clip_max_norm=0.1, warmup_steps=100, lr_drop=0.7, time_budget=420, num_workers=0, log_every=100,
        eval_every=500, checkpoint_every=500, output_dir="runs/demo",
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


# ----------------------------------------------------------------------------------------------- processes, devices


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: nccl on CUDA, gloo on
    CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world_size, torch.device(device)


# ------------------------------------------------------------------------------------------------------------- data


def build_datasets(cfg: TrainConfig) -> tuple[CocoDetection, CocoDetection]:
    """(train, val) datasets; writes the synthetic set first when cfg.dataset is "synthetic"."""
    if cfg.dataset == "synthetic":
        root = cfg.data_dir or os.path.join(cfg.output_dir, "data")
        spec = SyntheticSpec(**cfg.synthetic_spec)
        if is_main_process():  # one writer; the others wait at the barrier
            write_coco(root, "train", cfg.synthetic_train_images, cfg.seed, spec)
            write_coco(root, "val", cfg.synthetic_val_images, cfg.seed + 1, spec)
        if dist.is_initialized():
            dist.barrier()
        paths = (os.path.join(root, "train"), os.path.join(root, "annotations", "instances_train.json"),
                 os.path.join(root, "val"), os.path.join(root, "annotations", "instances_val.json"))
    elif cfg.dataset == "coco":
        paths = (cfg.train_images, cfg.train_annotations, cfg.val_images, cfg.val_annotations)
        names = ("train_images", "train_annotations", "val_images", "val_annotations")
        missing = [name for name, path in zip(names, paths) if not path]
        if missing:
            raise ValueError(f"dataset 'coco' needs {', '.join(missing)} (e.g. --train-images DIR)")
    else:
        raise ValueError(f"dataset must be 'synthetic' or 'coco', got {cfg.dataset!r}")
    train_tf = train_transforms(cfg.scales, cfg.max_size, cfg.crop_resize, cfg.crop_size, cfg.flip)
    val_tf = eval_transforms(cfg.eval_size, cfg.eval_max_size) if cfg.eval_size else None
    train_set = CocoDetection(paths[0], paths[1], train_tf, on_bad=cfg.on_bad, seed=cfg.seed)
    val_set = CocoDetection(paths[2], paths[3], val_tf, on_bad=cfg.on_bad, seed=cfg.seed)
    if train_set.label_to_category_id != val_set.label_to_category_id:
        raise ValueError(f"the categories of {paths[1]} and {paths[3]} differ: "
                         f"{train_set.label_to_category_id} vs {val_set.label_to_category_id}")
    return train_set, val_set


class StepBatchSampler(torch.utils.data.Sampler):
    """The batches of one epoch for one process: a permutation seeded by (seed, epoch), cut into global batches of
    batch_size * world_size images (the last incomplete one dropped), of which this rank takes its slice.
    `set_epoch(epoch, start)` starts at batch `start`, so a resumed run continues mid-epoch."""

    def __init__(self, num_images: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.steps_per_epoch = num_images // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_images} training images are fewer than one global batch "
                             f"({batch_size} per process x {world_size} processes)")
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_images, generator=generator).tolist()
        global_batch = self.batch_size * self.world_size
        for step in range(self.start, self.steps_per_epoch):
            first = step * global_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size]


def build_loader(dataset, batch_sampler, cfg: TrainConfig, device: torch.device) -> torch.utils.data.DataLoader:
    def collate_fn(samples):
        return collate(samples, max_targets=cfg.max_targets)

    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        # A private generator: creating a loader iterator must not draw from the global RNG that dropout uses.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


# ------------------------------------------------------------------------------------------ model and optimization


def build_model(cfg: TrainConfig, category_names: list[str]) -> DetrForObjectDetection:
    """DETR with one label per dataset category; the same weights in every process (seeded by cfg.seed)."""
    torch.manual_seed(cfg.seed)
    config = DetrConfig(**{**cfg.model, "num_labels": len(category_names), "id2label": dict(enumerate(category_names))})
    model = DetrForObjectDetection(config)
    if cfg.train_backbone_stem or cfg.lr_backbone_multiplier == 0:
        for parameter in model.model.backbone.parameters():  # a backbone at learning rate 0 is frozen, as in DETR
            parameter.requires_grad_(cfg.lr_backbone_multiplier > 0)
    return model


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (fused) with two parameter groups: the backbone at lr * lr_backbone_multiplier, the rest at lr."""
    backbone, rest = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (backbone if ".backbone." in f".{name}" else rest).append(parameter)
    groups = [{"params": rest, "lr": cfg.lr}]
    if backbone and cfg.lr_backbone_multiplier > 0:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.lr_backbone_multiplier})
    # The fused implementation (CPU and CUDA): one kernel for all parameters instead of a loop of elementwise ops,
    # which on a CPU took as long as the backbone's backward pass.
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


class WarmupStepSchedule:
    """LR multiplier at step s: linear warm-up over warmup_steps, then 1, then drop_factor from drop_step on.
    An object (not a lambda) so that LambdaLR's state dict carries drop_step."""

    def __init__(self, warmup_steps: int, drop_step: int, drop_factor: float):
        self.warmup_steps, self.drop_step, self.drop_factor = warmup_steps, drop_step, drop_factor

    def __call__(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return warmup * (self.drop_factor if step >= self.drop_step else 1.0)


def forward_backward(model: nn.Module, batch: dict, device: torch.device, amp_dtype: torch.dtype | None):
    """One forward and backward pass on a collated batch (no host sync).

    Returns:
        loss (scalar, detached), loss_dict (detached), match_status [L, B].
    """
    pixel_values = batch["pixel_values"].to(device, non_blocking=True)  # [B, 3, H, W]
    pixel_mask = batch["pixel_mask"].to(device, non_blocking=True)  # [B, H, W]
    labels = {key: value.to(device, non_blocking=True) for key, value in batch["labels"].items()}
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        output = model(pixel_values, pixel_mask, labels=labels)
    output.loss.backward()
    return output.loss.detach(), {k: v.detach() for k, v in output.loss_dict.items()}, output.match_status


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, scheduler, clip_max_norm: float,
               device: torch.device, amp_dtype: torch.dtype | None):
    """forward_backward, gradient clipping, optimizer and scheduler step (no host sync).

    Returns:
        loss (scalar), loss_dict, match_status [L, B], all detached.
    """
    loss, loss_dict, status = forward_backward(model, batch, device, amp_dtype)
    if clip_max_norm > 0:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(parameters, clip_max_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, loss_dict, status


# ----------------------------------------------------------------------------------------------------- checkpoints


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def rng_states() -> list[dict]:
    """The random-number states of every process (torch, Python, CUDA), indexed by rank: each process draws its
    own dropout masks, so a resume must give each its own state back. A collective under torch.distributed."""
    local = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not dist.is_initialized():
        return [local]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, local)
    return states


def set_rng_states(states: list[dict], rank: int, world_size: int, path: str) -> None:
    """Restore this process's entry of rng_states(); ValueError naming the checkpoint when it was written by another
    number of processes (the data order and the random draws of the rest of the run would differ)."""
    if len(states) != world_size:
        raise ValueError(f"checkpoint {path} was written by {len(states)} process(es); resume it with as many, "
                         f"not {world_size}")
    local = states[rank]
    torch.set_rng_state(local["torch"])
    random.setstate(local["python"])
    if local["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(local["cuda"])


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temporary file in the same folder, flushed to disk, then os.replace: a kill (or a power loss)
    leaves the old or the new checkpoint, never a partial one, and no temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


class NotATrainingCheckpoint(ValueError):
    """The file is no detr_fast training checkpoint at all: unreadable by torch.load, or without its format tag."""


def load_checkpoint(path: str) -> dict:
    """A training checkpoint written by save_checkpoint. NotATrainingCheckpoint (a ValueError) naming the file if it
    is corrupt, truncated or not a training checkpoint; ValueError if it is one of another format version or lacks
    entries."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle errors, unsafe globals: all a bad file here
        raise NotATrainingCheckpoint(
            f"checkpoint {path} is corrupt or not a torch checkpoint ({type(error).__name__}: {error})") from error
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if found != CHECKPOINT_FORMAT:
        written_by_us = isinstance(found, str) and found.startswith(CHECKPOINT_FORMAT.rsplit("-", 1)[0])
        if written_by_us:
            raise ValueError(f"checkpoint {path} was written by another detr_fast version (format {found!r}, "
                             f"expected {CHECKPOINT_FORMAT!r}); its weights load with "
                             "load_into(model, torch.load(...)['model'])")
        raise NotATrainingCheckpoint(f"checkpoint {path} is not a detr_fast training checkpoint (format {found!r}, "
                                     f"expected {CHECKPOINT_FORMAT!r})")
    missing = {"model", "optimizer", "scheduler", "rng", "step", "position", "config", "model_config",
               "history"} - set(state)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}")
    return state


def check_resumable(cfg: TrainConfig, stored: dict, path: str) -> TrainConfig:
    """The config to continue with: the stored run's, with the runtime fields of `cfg`. ValueError listing the
    fields where `cfg` would change what the run computes."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if set(stored) != names:
        raise ValueError(f"checkpoint {path} was written by another version of the training config "
                         f"(fields differ: {sorted(set(stored) ^ names)})")
    current = dataclasses.asdict(cfg)
    # A run sized by a time budget stores the step count it derived; resuming it without --steps keeps that.
    differ = [name for name in sorted(names - RUNTIME_FIELDS)
              if _normalized(current[name]) != _normalized(stored[name])
              and not (name == "steps" and cfg.steps is None)]
    if differ:
        details = "; ".join(f"{name}: checkpoint {stored[name]!r}, now {current[name]!r}" for name in differ)
        raise ValueError(f"checkpoint {path} is from a different run: {details}")
    return TrainConfig(**{**stored, **{name: current[name] for name in RUNTIME_FIELDS}})


def _normalized(value: Any) -> Any:
    """Tuples and lists compare equal (a checkpoint stores both as lists)."""
    if isinstance(value, list | tuple):
        return [_normalized(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------------- the loop


def steps_for_budget(cfg: TrainConfig, step: int, start: float, calibration_start: float | None) -> int | None:
    """The step count that fills cfg.time_budget at the speed measured since step cfg.calibration_steps, decided
    once half of the budget is spent (a long window: the speed of the first steps varies with the machine's load);
    None before. The learning-rate drop comes later (at lr_drop of the steps), so the run equals one started with
    that step count."""
    now = time.perf_counter()
    if calibration_start is None or step <= cfg.calibration_steps or now - start < cfg.time_budget / 2:
        return None
    per_step = (now - calibration_start) / (step - cfg.calibration_steps)
    return step + max(0, int((cfg.time_budget - (now - start)) / per_step))


class Progress:
    """One status line per log step: rewritten in place on a terminal, printed line by line elsewhere."""

    def __init__(self, total: int | None, enabled: bool):
        self.total, self.enabled = total, enabled  # total None: not known yet (a time budget being calibrated)
        self.tty = sys.stdout.isatty()

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        filled = int(20 * step / self.total) if self.total else 0
        line = f"[{'#' * filled}{'.' * (20 - filled)}] {step}/{self.total or '?'} {text}"
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, flush=True)


def train(cfg: TrainConfig, resume: str | None = None, stop_after: int | None = None) -> dict:
    """Train, evaluate at the end (and every cfg.eval_every steps), write the outputs (write_outputs).

    Args:
        cfg: the run's configuration.
        resume: a checkpoint to continue from ("auto": <output_dir>/checkpoint.pt if it exists). A run sized by a
            time budget that stopped before its step count was decided measures its speed again.
        stop_after: end the process's work after this global step (a checkpoint is written there), as a kill
            would; resuming continues the same run.
    Returns:
        {"history": log and evaluation records, "metrics": of the last evaluation ({} when stopped early),
        "steps", "train_seconds", "images_per_s", "config": the config run (steps resolved)}.
    """
    rank, world_size, device = setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    checkpoint_path = os.path.join(cfg.output_dir, "checkpoint.pt")
    if resume == "auto":
        resume = checkpoint_path if os.path.exists(checkpoint_path) else None
    state = None
    if resume:
        state = load_checkpoint(resume)
        cfg = check_resumable(cfg, state["config"], resume)

    train_set, val_set = build_datasets(cfg)
    if cfg.evaluate:
        val_set.coco  # noqa: B018 -- pycocotools' ground truth: a missing pycocotools fails now, not after training
    model = build_model(cfg, train_set.category_names).to(device)
    sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, rank, world_size)
    if cfg.steps is None and cfg.epochs is not None:
        cfg.steps = max(1, math.ceil(cfg.epochs * sampler.steps_per_epoch))
    if cfg.steps is None and cfg.time_budget is None:
        raise ValueError("give the run's length: steps, epochs or time_budget")
    optimizer = build_optimizer(model, cfg)
    # Until a time budget is converted into steps the drop step is unknown; it lies past that decision.
    schedule = WarmupStepSchedule(cfg.warmup_steps, int(cfg.lr_drop * cfg.steps) if cfg.steps else 2**62,
                                  cfg.lr_drop_factor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step, history = 0, []
    position = 0  # batches taken from the sampler: one per step, plus batches skipped whole (every image unreadable)
    torch.manual_seed(cfg.seed + rank)  # dropout differs between processes; the model init above does not
    random.seed(cfg.seed)  # LayerDrop's draws: the same layers skipped on every process
    if state is not None:
        load_into(model, state["model"], resume)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_states(state["rng"], rank, world_size, resume)
        step, history, position = state["step"], state["history"], state["position"]
    first_step = step

    amp_dtype = autocast_dtype(cfg.amp, device)
    step_model = model
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        # A layer LayerDrop skips gets no gradient in that step; DDP must then look for unused parameters.
        layerdrop = model.config.encoder_layerdrop > 0 or model.config.decoder_layerdrop > 0
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                         find_unused_parameters=layerdrop)
    if cfg.compile:
        step_model = torch.compile(step_model)
    loader = build_loader(train_set, sampler, cfg, device)
    progress = Progress(cfg.steps, is_main_process())
    progress.message(f"training on {device} ({world_size} process{'es' if world_size > 1 else ''}): "
                     f"{len(train_set)} images, {cfg.batch_size * world_size} per step, "
                     f"{sampler.steps_per_epoch} steps per epoch" + (f", resuming at step {step}" if step else ""))

    def checkpoint() -> None:
        rng = rng_states()  # every process takes part
        if is_main_process():
            save_checkpoint(checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng, "step": step, "position": position,
                "config": dataclasses.asdict(cfg), "model_config": model.config.to_dict(), "history": history,
            })
        if dist.is_initialized():
            dist.barrier()  # no process goes on (and may resume from the file) before it is written

    def run_evaluation() -> dict:
        metrics = evaluate(model, val_set, batch_size=cfg.eval_batch_size or cfg.batch_size, device=device,
                           amp=cfg.amp, num_workers=cfg.num_workers)
        history.append({"step": step, **{k: metrics[k] for k in ("map", "map50")}})
        progress.message(f"step {step}: mAP {metrics['map']:.3f}, mAP@0.5 {metrics['map50']:.3f}")
        return metrics

    model.train()
    sums = {}  # loss terms summed on the device since the last log
    bad_matches = torch.zeros((), dtype=torch.int64, device=device)
    images, skipped, last_log_step = 0, 0, step
    start = last_log = time.perf_counter()
    calibration_start = None
    metrics: dict = {}
    while cfg.steps is None or step < cfg.steps:
        epoch, offset = divmod(position, sampler.steps_per_epoch)
        sampler.set_epoch(epoch, offset)
        train_set.set_epoch(epoch)
        for batch in loader:
            position += 1
            skipped += batch["num_skipped"]
            if "pixel_values" not in batch:  # every image of the batch was unreadable and skipped
                if world_size > 1:
                    raise RuntimeError(f"rank {rank}: every image of a batch was unreadable; with several processes "
                                       "a step cannot be skipped on one of them alone")
                continue
            loss, loss_dict, status = train_step(step_model, batch, optimizer, scheduler, cfg.clip_max_norm, device,
                                                 amp_dtype)
            step += 1
            images += len(batch["image_ids"]) * world_size
            for key, value in {"loss": loss, **loss_dict}.items():
                sums[key] = sums.get(key, 0) + value
            bad_matches += (status != 0).sum()

            if cfg.steps is None and step == cfg.calibration_steps:
                calibration_start = time.perf_counter()  # the first steps include warm-up costs; time the next ones
            if cfg.steps is None and step % cfg.log_every == 0:
                proposal = steps_for_budget(cfg, step, start, calibration_start) if is_main_process() else None
                if world_size > 1:  # every process must run the same number of steps: rank 0 decides
                    shared = torch.tensor(proposal or 0, device=device)
                    dist.broadcast(shared, 0)
                    proposal = int(shared) or None
                if proposal:
                    cfg.steps = proposal
                    schedule.drop_step = int(cfg.lr_drop * cfg.steps)
                    progress.total = cfg.steps
                    progress.message(f"{cfg.steps} steps fit the {cfg.time_budget:.0f} s budget at the speed of steps "
                                     f"{cfg.calibration_steps}-{step} (`--steps {cfg.steps}` repeats this run exactly)")

            if step % cfg.log_every == 0 or step == cfg.steps:
                if world_size > 1:  # log the mean over every process's images, as DETR's reduce_dict does
                    totals = torch.stack([*sums.values(), bad_matches.to(loss.dtype)])
                    dist.all_reduce(totals)
                    sums = dict(zip(sums, totals[:-1] / world_size))
                    bad_matches.fill_(totals[-1].to(bad_matches.dtype))
                # The only host syncs of training: reading the accumulated losses and matcher status.
                record = {"step": step, **{k: float(v) / (step - last_log_step) for k, v in sums.items()},
                          "lr": scheduler.get_last_lr()[0], "images_per_s": images / (time.perf_counter() - last_log)}
                history.append(record)
                if int(bad_matches):
                    progress.message(f"warning: {int(bad_matches)} matching problem(s) since the last log were not "
                                     "solvable (non-finite predictions?)")
                progress.update(step, f"loss {record['loss']:.3f} (ce {record['loss_ce']:.3f} bbox "
                                      f"{record['loss_bbox']:.3f} giou {record['loss_giou']:.3f}) | "
                                      f"lr {record['lr']:.1e} | {record['images_per_s']:.1f} img/s")
                sums, images, last_log, last_log_step = {}, 0, time.perf_counter(), step
                bad_matches.zero_()
            if cfg.evaluate and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                metrics = run_evaluation()
                model.train()
            if (step % cfg.checkpoint_every == 0 and step != cfg.steps) or step == stop_after:
                checkpoint()
            if step == cfg.steps or step == stop_after:
                break
        if step == stop_after:
            break

    seconds = time.perf_counter() - start
    if skipped:
        progress.message(f"skipped {skipped} unreadable image(s) during training")
    if step == cfg.steps:
        if cfg.evaluate:
            checkpoint()  # the trained weights are safe whatever the evaluation does
            metrics = run_evaluation()
        checkpoint()
        if is_main_process():
            write_outputs(cfg.output_dir, model, val_set, history, metrics, device, cfg.amp)
    return {"history": history, "metrics": metrics, "steps": step, "train_seconds": seconds,
            "images_per_s": (step - first_step) * cfg.batch_size * world_size / seconds, "config": cfg}


def write_outputs(output_dir: str, model: DetrForObjectDetection, val_set: CocoDetection, history: list[dict],
                  metrics: dict, device: torch.device, amp: str) -> None:
    """The run's results: metrics.json, history.json, the weights in model/ (config.json + model.safetensors),
    and with matplotlib the curves (curves.png) and validation detections (detections.png)."""
    if metrics:  # none when the run did not evaluate (cfg.evaluate False)
        write_metrics(metrics, os.path.join(output_dir, "metrics.json"))
    with open(os.path.join(output_dir, "history.json"), "w") as f:
        json.dump(history, f, indent=1)
    model.save_pretrained(os.path.join(output_dir, "model"))
    try:
        from .plots import plot_curves, plot_validation_detections

        plot_curves(history, os.path.join(output_dir, "curves.png"))
        plot_validation_detections(model, val_set, os.path.join(output_dir, "detections.png"), device, amp=amp)
    except ImportError as error:
        print(f"no PNGs written: {error}")
