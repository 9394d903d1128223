"""The run's processes and precision: the default thread count leaves busy cores alone, autocast choices."""

import subprocess
import sys
import time

import pytest
import torch

from detr_fast import runtime


def test_default_threads_take_the_free_cores(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 8)
    monkeypatch.setattr(runtime, "busy_cpus", lambda seconds=0.5: 0.2)
    assert runtime.default_threads() == 8
    monkeypatch.setattr(runtime, "busy_cpus", lambda seconds=0.5: 2.7)
    assert runtime.default_threads() == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of the run on this machine share the free cores
    assert runtime.default_threads() == 2
    monkeypatch.setattr(runtime, "busy_cpus", lambda seconds=0.5: 8.0)
    assert runtime.default_threads() == 1


def test_busy_cpus_sees_a_busy_process():
    if runtime.available_cpus() < 2:
        pytest.skip("needs two CPUs: one busy, one measuring")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert runtime.busy_cpus(0.5) >= 0.7
    finally:
        busy.kill()


def test_autocast_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.autocast_dtype("auto", cpu) is None and runtime.autocast_dtype("auto", cuda) == torch.bfloat16
    assert runtime.autocast_dtype("bf16", cpu) == torch.bfloat16 and runtime.autocast_dtype("off", cuda) is None
    with pytest.raises(ValueError, match="amp must be one of 'auto', 'bf16', 'off', got 'fp16'"):
        runtime.autocast_dtype("fp16", cpu)
