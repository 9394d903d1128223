"""Shared benchmark plumbing: timing (CUDA events on GPU, interleaved medians on CPU), environment record, output.

Every benchmark script builds rows of one schema, one row per (measured case, implementation), in this order: the
case's fields (shape sizes, dtype, mode, ...), then "impl" (the implementation's name) and "ms" (its median
milliseconds), then any measurements of that implementation alone (peak memory, a loss, a check). The fields before
"impl" name the case (the plot groups by them). Ratios between implementations are not columns: the scripts compute
them from the rows (`ms_of`) where they write their targets. `write_results` writes the rows to
bench/results/<name>-<device>-<date>.json, .md and .png.
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
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
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


def row_of(rows: Sequence[dict[str, Any]], impl: str, **case: Any) -> dict[str, Any] | None:
    """The row of `impl` whose fields equal `case`, or None where it was not measured. More than one such row is an
    error: the case must name the row."""
    found = [r for r in rows if r["impl"] == impl and all(r.get(k) == v for k, v in case.items())]
    if len(found) > 1:
        raise ValueError(f"{len(found)} rows of {impl!r} match {case}")
    return found[0] if found else None


def ms_of(rows: Sequence[dict[str, Any]], impl: str, **case: Any) -> float | None:
    """Milliseconds of `impl` on `case` (see `row_of`), or None where it was not measured."""
    row = row_of(rows, impl, **case)
    return None if row is None else row["ms"]


def case_fields(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The fields that name a case: those before "impl" in the rows, in first-seen order."""
    fields: list[str] = []
    for row in rows:
        for key in row:
            if key == "impl":
                break
            if key not in fields:
                fields.append(key)
    return fields


def plot_results(rows: Sequence[dict[str, Any]], title: str, path: str, max_panels: int = 24) -> str | None:
    """Scaling plot: milliseconds against the case's size that varies most (an integer field), one line per
    implementation, one panel per combination of the other case fields that vary (dtype, mode, B, ...).
    Returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    varying = [k for k in case_fields(rows) if len({repr(r.get(k)) for r in rows}) > 1]
    sizes = [k for k in varying if all(isinstance(r.get(k), int) and not isinstance(r.get(k), bool) for r in rows)]
    x_key = max(sizes, key=lambda k: len({r[k] for r in rows}), default=None)
    facets = [k for k in varying if k != x_key]
    panels: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        panels.setdefault(tuple(row.get(k) for k in facets), []).append(row)
    names = sorted(panels, key=repr)[:max_panels]
    columns = min(4, len(names))
    figure_rows = -(-len(names) // columns)
    fig, axes = plt.subplots(figure_rows, columns, figsize=(4.2 * columns, 3.2 * figure_rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(facets, name)) or title, fontsize=8)
        if x_key is None:  # nothing scales in this run (a single size): one bar per implementation
            impls = [str(r["impl"]) for r in panels[name]]
            ax.bar(range(len(impls)), [r["ms"] for r in panels[name]], color=[f"C{i}" for i in range(len(impls))])
            ax.set_xticks(range(len(impls)), impls, rotation=30, ha="right", fontsize=6)
            continue
        by_impl: dict[str, list[tuple[Any, float]]] = {}
        for row in panels[name]:
            by_impl.setdefault(str(row["impl"]), []).append((row[x_key], row["ms"]))
        for impl, points in sorted(by_impl.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
        values = [r[x_key] for r in rows]
        if max(values) >= 4 * max(1, min(values)):
            ax.set_xscale("log")
        ax.set_xlabel(x_key)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_results(name: str, rows: Sequence[dict[str, Any]], info: dict[str, Any], out: str, notes: str = "") -> str:
    """Write <out>/<name>-<device>-<date>.json, .md and a scaling plot .png; return the JSON path."""
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
        png = plot_results(rows, f"{name} on {info.get('gpu') or 'CPU'}", os.path.join(out, stem + ".png"))
        if png:
            f.write(f"\n![{name}]({os.path.basename(png)})\n")
        f.write(markdown_table(rows))
    print(markdown_table(rows))
    return path
