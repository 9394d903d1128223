"""Training (`detr-fast train`), along the lines of facebookresearch/detr: the run's configuration and presets
(config), its data (data), one step and what surrounds it (engine), checkpoints (checkpoint) and the loop (loop).
The process and precision helpers are detr_fast.runtime's."""

from .checkpoint import (
    CHECKPOINT_FORMAT,
    NotATrainingCheckpoint,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from .config import PRESETS, TrainConfig, preset
from .data import StepBatchSampler, build_datasets, build_loader
from .engine import WarmupStepSchedule, build_model, build_optimizer, forward_backward, train_step
from .loop import train

__all__ = [
    "CHECKPOINT_FORMAT",
    "PRESETS",
    "NotATrainingCheckpoint",
    "StepBatchSampler",
    "TrainConfig",
    "WarmupStepSchedule",
    "build_datasets",
    "build_loader",
    "build_model",
    "build_optimizer",
    "forward_backward",
    "load_checkpoint",
    "preset",
    "rng_states",
    "save_checkpoint",
    "set_rng_states",
    "train",
    "train_step",
]
