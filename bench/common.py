"""Shared benchmark plumbing: timing (CUDA events on GPU, interleaved medians on CPU), environment record, output.

Every benchmark script builds rows (one dict per measured case: shapes, dtype, implementation, time, derived
rates) and hands them to `write_results`, which writes bench/results/<name>-<device>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="a small grid that runs in about a minute on a CPU")
    p.add_argument("--out", default=RESULTS_DIR, help="folder for the JSON and markdown results")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (CPU); default 7, quick 3")
    return p


def environment(device: str) -> dict[str, Any]:
    """Device, versions and host of this run, recorded with every result."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def device_label(info: dict[str, Any]) -> str:
    """A short file-name-safe label for the device: the GPU name or 'cpu'."""
    name = info.get("gpu") or "cpu"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def time_cuda(fn: Callable[[], Any]) -> float:
    """Median milliseconds of fn() on the GPU, by CUDA events, warm-up excluded (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, return_mode="median"))


def time_cpu(fns: dict[str, Callable[[], Any]], repeats: int = 7, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds of each fn, measured interleaved (a, b, c, a, b, c, ...) so that load on this shared
    machine hits every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def time_all(fns: dict[str, Callable[[], Any]], device: str, repeats: int = 7) -> dict[str, float]:
    """Median milliseconds of each fn on `device`."""
    if device == "cuda":
        return {name: time_cuda(fn) for name, fn in fns.items()}
    return time_cpu(fns, repeats=repeats)


def peak_memory_mib(fn: Callable[[], object], device: str) -> float | None:
    """MiB that one call of fn allocates at its peak beyond what was allocated before (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of dicts as a markdown table (columns in first-seen order)."""
    if not rows:
        return "(no rows)\n"
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, rows: Sequence[dict[str, Any]], info: dict[str, Any], out: str, notes: str = "") -> str:
    """Write <out>/<name>-<device>-<date>.json and .md; return the JSON path."""
    os.makedirs(out, exist_ok=True)
    stem = f"{name}-{device_label(info)}-{info['date'][:10]}"
    path = os.path.join(out, stem + ".json")
    with open(path, "w") as f:
        json.dump({"benchmark": name, "environment": info, "rows": list(rows), "notes": notes}, f, indent=2)
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(f"# {name} on {info.get('gpu') or 'CPU'} ({info['date']})\n\n")
        f.write(", ".join(f"{k}: {v}" for k, v in info.items()) + "\n\n")
        if notes:
            f.write(notes.strip() + "\n\n")
        f.write(markdown_table(rows))
    print(markdown_table(rows))
    return path
