"""`train()`: the training loop, one readable loop for a single process and for torchrun DDP.

    batch -> model(pixel_values, pixel_mask, labels=padded targets) -> loss -> backward -> clip -> AdamW -> LR step

The step between the forward pass and backward() has no host sync: the targets are padded (fixed shapes), the
losses and the matcher status are accumulated on the device and read only every `log_every` steps. Checkpoints
(detr_fast.train.checkpoint) hold everything a resumed run needs to continue as if it had never stopped, and the
batches of step s are a function of (seed, s) alone, so a resumed run sees exactly the batches the uninterrupted
one would.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.datasets import CocoImages
from ..evaluate import evaluate
from ..model import DetrPreTrainedModel
from ..runtime import autocast_dtype, default_threads, is_main_process, setup_distributed
from ..segmentation_metrics import evaluate_instances, evaluate_panoptic
from .checkpoint import check_resumable, load_checkpoint, restore, write_checkpoint
from .config import TrainConfig, validate
from .data import StepBatchSampler, build_datasets, build_loader
from .engine import (
    LossMeter,
    Progress,
    StepBudget,
    WarmupStepSchedule,
    build_model,
    build_optimizer,
    initialize_from,
    train_mask_head_on,
    train_step,
    write_outputs,
)


@dataclass
class Run:
    """Everything a training run holds (built by `prepare`), and what it does besides stepping."""

    cfg: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    train_set: CocoImages
    val_set: CocoImages
    model: DetrPreTrainedModel
    step_model: nn.Module  # the model as the step calls it: wrapped by DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: WarmupStepSchedule
    sampler: StepBatchSampler
    loader: torch.utils.data.DataLoader
    step: int = 0
    position: int = 0  # batches taken from the sampler: one per step, plus batches skipped whole
    history: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what preparing the run has to say (fine-tuning's loads)

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.output_dir, "checkpoint.pt")

    def batches(self) -> Iterator[dict]:
        """The batches from the current position on, epoch after epoch (sampler and augmentation follow the epoch)."""
        while True:
            epoch, offset = divmod(self.position, self.sampler.steps_per_epoch)
            self.sampler.set_epoch(epoch, offset)
            self.train_set.set_epoch(epoch)
            for batch in self.loader:
                self.position += 1
                yield batch

    def set_steps(self, steps: int) -> None:
        """Fix the run's length (a time budget decided), and with it the step of the learning-rate drop."""
        self.cfg.steps = steps
        self.schedule.drop_step = int(self.cfg.lr_drop * steps)

    def log(self, meter: LossMeter, progress: Progress) -> None:
        """Read the loss meter (a host sync), record it in the history and show it."""
        record, bad_matches = meter.read(self.step, self.scheduler.get_last_lr()[0])
        self.history.append(record)
        if bad_matches:
            progress.message(
                f"warning: {bad_matches} matching problem(s) since the last log were not solvable "
                "(non-finite predictions?)"
            )
        progress.update(
            self.step,
            f"loss {record['loss']:.3f} (ce {record['loss_ce']:.3f} bbox {record['loss_bbox']:.3f} giou "
            f"{record['loss_giou']:.3f}) | lr {record['lr']:.1e} | {record['images_per_s']:.1f} img/s",
        )

    def checkpoint(self) -> None:
        write_checkpoint(
            self.checkpoint_path,
            self.model,
            self.optimizer,
            self.scheduler,
            self.step,
            self.position,
            self.cfg,
            self.history,
        )

    def evaluate(self, progress: Progress) -> dict:
        """The validation metrics of the model now, recorded in the history (back to training mode): COCO box mAP,
        with mask mAP for task "instance"; PQ, SQ and RQ and the things' mask mAP for task "panoptic"."""
        cfg = self.cfg
        batch_size = cfg.eval_batch_size or cfg.batch_size
        if cfg.task == "panoptic":
            metrics = evaluate_panoptic(
                self.model, self.val_set, batch_size, self.device, cfg.amp, num_workers=cfg.num_workers, masks=True
            )
            recorded = ("pq", "pq_things", "pq_stuff", "mask_map")
            line = (
                f"PQ {metrics['pq']:.3f} (things {metrics['pq_things']:.3f}, stuff {metrics['pq_stuff']:.3f}), "
                f"mask mAP {metrics['mask_map']:.3f} (things)"
            )
        else:
            metrics = evaluate(self.model, self.val_set, batch_size, self.device, cfg.amp, cfg.num_workers)
            recorded = ("map", "map50")
            line = f"mAP {metrics['map']:.3f}, mAP@0.5 {metrics['map50']:.3f}"
            if cfg.task == "instance":
                metrics.update(evaluate_instances(self.model, self.val_set, batch_size, self.device, cfg.amp))
                recorded += ("mask_map",)
                line += f", mask mAP {metrics['mask_map']:.3f}"
        self.history.append({"step": self.step, **{k: metrics[k] for k in recorded}})
        progress.message(f"step {self.step}: {line}")
        self.model.train()
        return metrics


def prepare(cfg: TrainConfig, resume: str | None) -> Run:
    """Processes, data, model, optimizer and schedule of a run; continued from `resume` when given ("auto":
    <output_dir>/checkpoint.pt if it exists)."""
    rank, world_size, device = setup_distributed(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or default_threads())
    elif cfg.threads:
        torch.set_num_threads(cfg.threads)
    if resume == "auto":
        resume = os.path.join(cfg.output_dir, "checkpoint.pt")
        resume = resume if os.path.exists(resume) else None
    state = load_checkpoint(resume) if resume else None
    if state is not None:
        cfg = check_resumable(cfg, state["config"], resume)
    validate(cfg)
    train_set, val_set = build_datasets(cfg)
    if cfg.evaluate and cfg.task != "panoptic":  # PQ needs no pycocotools
        val_set.coco  # noqa: B018 -- pycocotools' ground truth: a missing pycocotools fails now, not after training
    model = build_model(cfg, train_set.category_names, train_set.label_to_category_id).to(device)
    notes = []
    if cfg.init_from and state is None:  # a resumed run has its own weights
        notes = initialize_from(model, cfg.init_from)
    if cfg.freeze_detector:
        notes += train_mask_head_on(model, cfg.freeze_detector, load=state is None)
    sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, rank, world_size)
    if cfg.steps is None and cfg.epochs is not None:
        cfg.steps = max(1, math.ceil(cfg.epochs * sampler.steps_per_epoch))
    if cfg.steps is None and cfg.time_budget is None:
        raise ValueError("give the run's length: steps, epochs or time_budget")
    optimizer = build_optimizer(model, cfg)
    # Until a time budget is converted into steps the drop step is unknown; it lies past that decision.
    schedule = WarmupStepSchedule(
        cfg.warmup_steps, int(cfg.lr_drop * cfg.steps) if cfg.steps else 2**62, cfg.lr_drop_factor
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    torch.manual_seed(cfg.seed + rank)  # dropout differs between processes; the model init above does not
    random.seed(cfg.seed)  # LayerDrop's draws: the same layers skipped on every process
    step_model = model
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        # A layer LayerDrop skips gets no gradient in that step; DDP must then look for unused parameters.
        layerdrop = model.config.encoder_layerdrop > 0 or model.config.decoder_layerdrop > 0
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=layerdrop)
    if cfg.compile:
        step_model = torch.compile(step_model)
    run = Run(
        cfg,
        rank,
        world_size,
        device,
        train_set,
        val_set,
        model,
        step_model,
        optimizer,
        scheduler,
        schedule,
        sampler,
        build_loader(train_set, sampler, cfg, device),
        notes=notes,
    )
    if state is not None:
        run.step, run.position, run.history = restore(state, resume, model, optimizer, scheduler, rank, world_size)
    return run


def train(cfg: TrainConfig, resume: str | None = None, stop_after: int | None = None) -> dict:
    """Train, evaluate at the end (and every cfg.eval_every steps), write the outputs (engine.write_outputs).

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
    run = prepare(cfg, resume)
    cfg, first_step, skipped, metrics = run.cfg, run.step, 0, {}
    progress = Progress(cfg.steps, run.step, is_main_process())
    progress.message(
        f"training on {run.device} ({run.world_size} process{'es' if run.world_size > 1 else ''}): "
        f"{len(run.train_set)} images, {cfg.batch_size * run.world_size} per step, "
        f"{run.sampler.steps_per_epoch} steps per epoch, {torch.get_num_threads()} CPU thread(s)"
        + (f", resuming at step {run.step}" if run.step else "")
    )
    for note in run.notes:
        progress.message(note)
    meter, budget, amp_dtype = LossMeter(run.device), StepBudget(cfg), autocast_dtype(cfg.amp, run.device)
    batches, start = run.batches(), time.perf_counter()
    run.model.train()
    while (cfg.steps is None or run.step < cfg.steps) and run.step != stop_after:
        batch = next(batches)
        skipped += batch["num_skipped"]
        if "pixel_values" not in batch:  # every image of the batch was unreadable and skipped
            if run.world_size > 1:
                raise RuntimeError(
                    f"rank {run.rank}: every image of a batch was unreadable; with several processes "
                    "a step cannot be skipped on one of them alone"
                )
            continue
        loss, loss_dict, status = train_step(
            run.step_model, batch, run.optimizer, run.scheduler, cfg.clip_max_norm, run.device, amp_dtype
        )
        run.step += 1
        meter.add(loss, loss_dict, status, len(batch["image_ids"]) * run.world_size)
        if cfg.steps is None and (steps := budget.steps(run.step, run.device)):
            run.set_steps(steps)
            progress.total = steps
            progress.message(
                f"{steps} steps fit the {cfg.time_budget:.0f} s budget at the speed of steps "
                f"{cfg.calibration_steps}-{run.step} (`--steps {steps}` repeats this run exactly)"
            )
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            run.log(meter, progress)
        if cfg.evaluate and cfg.eval_every and run.step % cfg.eval_every == 0 and run.step != cfg.steps:
            metrics = run.evaluate(progress)
        if (run.step % cfg.checkpoint_every == 0 and run.step != cfg.steps) or run.step == stop_after:
            run.checkpoint()

    seconds = time.perf_counter() - start
    if skipped:
        progress.message(f"skipped {skipped} unreadable image(s) during training")
    if run.step == cfg.steps:
        if cfg.evaluate:
            run.checkpoint()  # the trained weights are safe whatever the evaluation does
            metrics = run.evaluate(progress)
        run.checkpoint()
        if is_main_process():
            written = write_outputs(cfg.output_dir, run.model, run.val_set, run.history, metrics, run.device, cfg)
            progress.message(f"wrote {cfg.output_dir}/: checkpoint.pt, {', '.join(written)}")
    return {
        "history": run.history,
        "metrics": metrics,
        "steps": run.step,
        "train_seconds": seconds,
        "images_per_s": (run.step - first_step) * cfg.batch_size * run.world_size / seconds,
        "config": cfg,
    }
