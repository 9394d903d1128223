"""The processes and the precision of a run, as DETR's util/misc.py: torch.distributed helpers (joining the
process group, is the run distributed, the main process, a mean over processes) and the autocast context.

The lowest layer of the package above the ops: the loss (num_boxes over every process), evaluation and training
all read it, and it imports nothing of detr_fast.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

AMP_MODES = ("auto", "bf16", "off")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cpus(seconds: float = 0.5) -> float:
    """How many CPUs other processes keep busy now: the non-idle share of every CPU over `seconds` (this process
    sleeps meanwhile), from /proc/stat; 0 where that file does not exist."""
    if not os.path.exists("/proc/stat"):
        return 0.0

    def totals() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]  # the "cpu" line: every CPU together
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    total_before, idle_before = totals()
    time.sleep(seconds)
    total, idle = totals()
    elapsed = total - total_before
    if elapsed <= 0:
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle - idle_before) / elapsed)


def default_threads() -> int:
    """torch's CPU threads for a run: the available CPUs that other processes do not keep busy, shared among this
    machine's processes of the run (torchrun's LOCAL_WORLD_SIZE), at least 1. One thread more than the free cores
    makes the threads wait on each other behind the busy core: on the 2-core development machine, with one other
    busy process, 2 threads trained at 80 images/s and 1 at 154 (bench/results/cpu_threads-*.md)."""
    free = available_cpus() - round(busy_cpus())
    return max(1, free // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve_device(name: str) -> torch.device:
    """The device `name` says; "auto" is CUDA where torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: nccl on CUDA, gloo on
    CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = str(resolve_device(device))
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world_size, torch.device(device)


def is_distributed() -> bool:
    """True inside a process group of more than one process (torchrun)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def is_main_process() -> bool:
    """True on rank 0, and in a run of one process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (nothing to wait for in a run of one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over every process (the tensor itself in a run of one); no host sync."""
    if not is_distributed():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the step for `amp` ("auto": bf16 on CUDA, none on the CPU; "bf16"; "off"), or None for
    full precision."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(repr(m) for m in AMP_MODES)}, got {amp!r}")
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """torch.autocast to `dtype` on `device`'s type; autocast off when dtype is None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
