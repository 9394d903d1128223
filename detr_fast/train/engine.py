"""One training step and what surrounds it, as DETR's engine.py: the model and optimizer of a run, the LR
schedule, forward/backward and the optimizer step (no host sync), the loss meter that logs, the time budget, the
progress line and the run's outputs. The loop that strings them together is detr_fast.train.loop.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from ..data.datasets import CocoImages
from ..evaluate import write_metrics
from ..model import DetrConfig, DetrForSegmentation, DetrPreTrainedModel, model_class
from ..model.weights import load_fitting, read_checkpoint
from ..processing import DetrImageProcessor
from ..runtime import autocast, is_distributed, is_main_process
from .config import TrainConfig, model_architecture


def build_model(
    cfg: TrainConfig, category_names: list[str], category_ids: list[int] | None = None
) -> DetrPreTrainedModel:
    """The run's model class (config.model_architecture) with one label per dataset category (named, and with its COCO
    category id recorded for evaluation and inference); the same weights in every process (seeded by cfg.seed)."""
    torch.manual_seed(cfg.seed)
    labels = {"num_labels": len(category_names), "id2label": dict(enumerate(category_names))}
    config = DetrConfig(**{**cfg.model, **labels, "category_ids": category_ids})
    model = model_class(model_architecture(cfg))(config)
    if cfg.train_backbone_stem or cfg.lr_backbone_multiplier == 0:
        for name, parameter in model.named_parameters():  # a backbone at learning rate 0 is frozen, as in DETR
            if ".backbone." in f".{name}":
                parameter.requires_grad_(cfg.lr_backbone_multiplier > 0)
    return model


def initialize_from(model: DetrPreTrainedModel, path: str) -> list[str]:
    """Fine-tuning: load the weights of checkpoint `path` (any layout from_pretrained reads, or a training
    checkpoint) that fit the model. The class head starts afresh when the checkpoint's label set differs (other
    names, or another number of labels). Returns the lines that say what was and was not loaded."""
    state_dict, stored = read_checkpoint(path)
    ours = model.config.id2label or {}
    theirs = (stored.id2label or {}) if stored is not None else {}
    if stored is not None and stored.num_labels != model.config.num_labels:
        reason = f"{stored.num_labels} labels in the checkpoint, {model.config.num_labels} in the dataset"
    elif ours and theirs and ours != theirs:
        reason = "the checkpoint's labels are named differently"
    else:
        reason = None
    head = tuple(f"{name}." for name, module in model.named_modules() if name.endswith("class_labels_classifier"))
    report = load_fitting(model, state_dict, skip=head if reason else ())
    expected = len(model.state_dict())
    lines = [f"initialized from {path}: {expected - len(report)} of {expected} tensors loaded"]
    if reason:
        lines.append(f"  the class head starts afresh ({reason})")
    lines += [f"  not loaded: {line}" for line in report]
    return lines


def train_mask_head_on(model: DetrForSegmentation, path: str, load: bool = True) -> list[str]:
    """DETR's two-step recipe: the detector's weights from checkpoint `path` (a detector's, or a segmentation
    model's), then the detector frozen, so that the attention map and the mask head train alone. A resumed run
    (`load` False) has its own weights and is only frozen again. Returns the lines that say what was done."""
    if load:
        state_dict, _ = read_checkpoint(path)
        model.load_weights(state_dict, path)
    model.freeze_detector()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return [f"detector from {path}, frozen: {trainable} parameters train (the attention map and the mask head)"]


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
    with autocast(device, amp_dtype):
        output = model(pixel_values, pixel_mask, labels=labels)
    output.loss.backward()
    return output.loss.detach(), {k: v.detach() for k, v in output.loss_dict.items()}, output.match_status


def train_step(
    model: nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    scheduler,
    clip_max_norm: float,
    device: torch.device,
    amp_dtype: torch.dtype | None,
):
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


class LossMeter:
    """The loss terms and the matcher's failures, summed on the device between two logs (no host sync), and read
    once per log: the only host syncs of training."""

    def __init__(self, device: torch.device):
        self.device = device
        self._start()

    def _start(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.bad_matches = torch.zeros((), dtype=torch.int64, device=self.device)
        self.steps, self.images, self.since = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, loss_dict: dict[str, torch.Tensor], status: torch.Tensor, images: int) -> None:
        """One step's loss, loss dict, match status [L, B] (0 = solved) and images (over every process)."""
        for key, value in {"loss": loss, **loss_dict}.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.bad_matches += (status != 0).sum()
        self.steps += 1
        self.images += images

    def read(self, step: int, lr: float) -> tuple[dict, int]:
        """The log record of the steps since the last read ({"step", every loss term's mean, "lr", "images_per_s"};
        under torch.distributed the mean over every process's images, as DETR's reduce_dict) and the number of
        matching problems that were not solvable; then starts over."""
        sums, bad_matches = self.sums, self.bad_matches
        if is_distributed():
            totals = torch.stack([*sums.values(), bad_matches.to(torch.float32)])
            dist.all_reduce(totals)
            sums = dict(zip(sums, totals[:-1] / dist.get_world_size()))
            bad_matches = totals[-1]
        record = {
            "step": step,
            **{k: float(v) / self.steps for k, v in sums.items()},
            "lr": lr,
            "images_per_s": self.images / (time.perf_counter() - self.since),
        }
        bad = int(bad_matches)
        self._start()
        return record, bad


class StepBudget:
    """Turns cfg.time_budget into a step count: from the speed measured after the first cfg.calibration_steps
    (which include warm-up costs), decided once half of the budget is spent (a long window: the speed of the first
    steps varies with the machine's load). The learning-rate drop comes later (at lr_drop of the steps), so the run
    equals one started with that step count."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.start, self.calibration_start = cfg, time.perf_counter(), None

    def steps(self, step: int, device: torch.device) -> int | None:
        """The run's step count once it can be decided at `step` (rank 0 decides for every process), else None."""
        cfg, now = self.cfg, time.perf_counter()
        if step == cfg.calibration_steps:
            self.calibration_start = now
        if step % cfg.log_every:
            return None
        proposal = None
        if (
            is_main_process()
            and self.calibration_start is not None
            and step > cfg.calibration_steps
            and now - self.start >= cfg.time_budget / 2
        ):
            per_step = (now - self.calibration_start) / (step - cfg.calibration_steps)
            proposal = step + max(0, int((cfg.time_budget - (now - self.start)) / per_step))
        if is_distributed():  # every process must run the same number of steps
            shared = torch.tensor(proposal or 0, device=device)
            dist.broadcast(shared, 0)
            proposal = int(shared) or None
        return proposal


class Progress:
    """One status line per log step with elapsed time and ETA: rewritten in place on a terminal, printed line by
    line elsewhere; silent on every process but the main one."""

    def __init__(self, total: int | None, first_step: int, enabled: bool):
        self.total, self.first_step, self.enabled = total, first_step, enabled  # total None: a budget not decided
        self.start = time.perf_counter()
        self.tty = sys.stdout.isatty()

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = "?"
        if self.total and step > self.first_step:
            eta = _clock(elapsed / (step - self.first_step) * (self.total - step))
        filled = int(20 * step / self.total) if self.total else 0
        line = (
            f"[{'#' * filled}{'.' * (20 - filled)}] {step}/{self.total or '?'} {text} | "
            f"elapsed {_clock(elapsed)}, ETA {eta}"
        )
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, flush=True)


def _clock(seconds: float) -> str:
    """h:mm:ss or m:ss."""
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def write_outputs(
    output_dir: str,
    model: DetrPreTrainedModel,
    val_set: CocoImages | None,
    history: list[dict],
    metrics: dict,
    device: torch.device,
    cfg: TrainConfig,
) -> list[str]:
    """The run's results: metrics.json (when it evaluated), history.json, the model in model/ (config.json with the
    labels and their category ids, model.safetensors, and preprocessor_config.json: the evaluation resize), and
    with matplotlib the curves (curves.png) and validation detections (detections.png), for task "panoptic" also
    the predicted panoptic maps beside the ground truth (panoptic.png). Returns the names written."""
    written = []
    if metrics:
        write_metrics(metrics, os.path.join(output_dir, "metrics.json"))
        written.append("metrics.json")
    with open(os.path.join(output_dir, "history.json"), "w") as f:
        json.dump(history, f, indent=1)
    model_dir = os.path.join(output_dir, "model")
    model.save_pretrained(model_dir)
    eval_size = {"shortest_edge": cfg.eval_size or 800, "longest_edge": cfg.eval_max_size}
    DetrImageProcessor(do_resize=cfg.eval_size is not None, size=eval_size).save_pretrained(model_dir)
    written += ["history.json", "model/ (config.json, model.safetensors, preprocessor_config.json)"]
    try:
        from ..plots import plot_curves, plot_validation_detections, plot_validation_panoptic

        plot_curves(history, os.path.join(output_dir, "curves.png"))
        written.append("curves.png")
        if val_set is not None:
            plot_validation_detections(model, val_set, os.path.join(output_dir, "detections.png"), device, amp=cfg.amp)
            written.append("detections.png")
            if cfg.task == "panoptic":
                plot_validation_panoptic(model, val_set, os.path.join(output_dir, "panoptic.png"), device, amp=cfg.amp)
                written.append("panoptic.png")
    except ImportError as error:
        print(f"no PNGs written: {error}")
    return written
