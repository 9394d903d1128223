"""Training checkpoints: the format, writing (atomic, every process's RNG state), reading and resuming.

A checkpoint holds everything a resumed run needs to continue as if it had never stopped: weights, optimizer,
scheduler, RNG states, step, sampler position, the run's config and its history.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model.weights import load_into
from ..runtime import barrier, is_distributed, is_main_process
from .config import RUNTIME_FIELDS, TrainConfig

CHECKPOINT_FORMAT = "detr_fast-train-2"  # 2: one RNG state per process, the sampler position


def rng_states() -> list[dict]:
    """The random-number states of every process (torch, Python, CUDA), indexed by rank: each process draws its
    own dropout masks, so a resume must give each its own state back. A collective under torch.distributed."""
    local = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if not is_distributed():
        return [local]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, local)
    return states


def set_rng_states(states: list[dict], rank: int, world_size: int, path: str) -> None:
    """Restore this process's entry of rng_states(); ValueError naming the checkpoint when it was written by another
    number of processes (the data order and the random draws of the rest of the run would differ)."""
    if len(states) != world_size:
        raise ValueError(
            f"checkpoint {path} was written by {len(states)} process(es); resume it with as many, not {world_size}"
        )
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
            f"checkpoint {path} is corrupt or not a torch checkpoint ({type(error).__name__}: {error})"
        ) from error
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if found != CHECKPOINT_FORMAT:
        written_by_us = isinstance(found, str) and found.startswith(CHECKPOINT_FORMAT.rsplit("-", 1)[0])
        if written_by_us:
            raise ValueError(
                f"checkpoint {path} was written by another detr_fast version (format {found!r}, "
                f"expected {CHECKPOINT_FORMAT!r}); its weights load with "
                "load_into(model, torch.load(...)['model'])"
            )
        raise NotATrainingCheckpoint(
            f"checkpoint {path} is not a detr_fast training checkpoint (format {found!r}, "
            f"expected {CHECKPOINT_FORMAT!r})"
        )
    missing = {"model", "optimizer", "scheduler", "rng", "step", "position", "config", "model_config", "history"} - set(
        state
    )
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}")
    return state


def check_resumable(cfg: TrainConfig, stored: dict, path: str) -> TrainConfig:
    """The config to continue with: the stored run's, with the runtime fields of `cfg`. ValueError listing the
    fields where `cfg` would change what the run computes."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if set(stored) != names:
        raise ValueError(
            f"checkpoint {path} was written by another version of the training config "
            f"(fields differ: {sorted(set(stored) ^ names)})"
        )
    current = dataclasses.asdict(cfg)
    # A run sized by a time budget stores the step count it derived; resuming it without --steps keeps that.
    differ = [
        name
        for name in sorted(names - RUNTIME_FIELDS)
        if _normalized(current[name]) != _normalized(stored[name]) and not (name == "steps" and cfg.steps is None)
    ]
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


def write_checkpoint(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    position: int,
    cfg: TrainConfig,
    history: list[dict],
) -> None:
    """Write the training checkpoint of the run at `step` (every process takes part; rank 0 writes). No process goes
    on, and may resume from the file, before it is written."""
    rng = rng_states()  # a collective
    if is_main_process():
        save_checkpoint(
            path,
            {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
                "step": step,
                "position": position,
                "config": dataclasses.asdict(cfg),
                "model_config": model.config.to_dict(),
                "history": history,
            },
        )
    barrier()


def restore(
    state: dict,
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
    world_size: int,
) -> tuple[int, int, list[dict]]:
    """Load a checkpoint's state (load_checkpoint) into the run's objects; returns (step, position, history)."""
    load_into(model, state["model"], path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"], rank, world_size, path)
    return state["step"], state["position"], state["history"]
