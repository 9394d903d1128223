"""Shared benchmark plumbing: timing (CUDA events on GPU, interleaved repeats on CPU), the environment and the load of
the machine, target lines and the exit status, output.

Every benchmark script builds rows of one schema, one row per (measured case, implementation), in this order: the
case's fields (shape sizes, dtype, mode, ...), then "impl" (the implementation's name), then its timing columns
(`Timing.columns`): "ms" (the median wall-clock milliseconds of the repeats), "spread" ((max - min) / median of the
repeats' wall times: 0.04 is 4 %), and on the CPU "cpu_ms" (the median CPU time of the calling thread, by
time.thread_time) and "repeats_ms" (every repeat's wall time, JSON only); then any measurements of that
implementation alone (peak memory, a loss, a check). The fields before "impl" name the case (the plot groups by
them). cpu_ms counts the calling thread only: it is the work of a single-threaded run, unaffected by waiting for a
busy core, and undercounts anything that runs on other threads.

Ratios between implementations are not columns: the scripts compute them from the rows where they write their target
lines, each beginning with PASS:, FAIL: or NOT MEASURED: (`verdict`, `speedup_line`); a line measured under a load
above the available CPUs or with a spread above NOISY_SPREAD says NOISY beside its verdict. `report_targets` prints
them and gives the script's exit status: 1 when a target FAILs. `write_results` writes the rows to
<out>/<name>-<device>-<date>.json, .md and .png; <out> is bench-results in the current directory unless --out says
otherwise (the repository's recorded runs: --out bench/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Relative: a folder of the user's in the current directory, never the repository's bench/results nor the package.
DEFAULT_OUT = "bench-results"
# A spread of the repeats above this makes a target line NOISY, as does a load above the available CPUs.
NOISY_SPREAD = 0.25
TARGET_LINE = re.compile(r"(PASS|FAIL|NOT MEASURED)( \(NOISY\))?: ")


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="a small grid that runs in about a minute on a CPU")
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"folder for the JSON, markdown and plot results and their index (default: {DEFAULT_OUT} in the current "
        "directory; --out bench/results records into the repository's runs)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (CPU); default 7, quick 3")
    return p


def machine_load() -> float:
    """The 1-minute load average: threads running or waiting for a core, this run's included."""
    return round(os.getloadavg()[0], 2)


def environment(device: str) -> dict[str, Any]:
    """Device, versions, host and the load at the start of this run, recorded with every result. Call it before the
    measurements (after setting torch's threads) and `record_end_load` after them."""
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
    info["cpus"] = len(os.sched_getaffinity(0))
    info["load_start"] = machine_load()
    return info


def record_end_load(info: dict[str, Any]) -> None:
    """Record the load at the end of the measurements in the environment (before the targets are evaluated)."""
    info["load_end"] = machine_load()


def device_label(info: dict[str, Any]) -> str:
    """A short file-name-safe label for the device: the GPU name or 'cpu'."""
    name = info.get("gpu") or "cpu"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


@dataclass(frozen=True)
class Timing:
    """Every repeat of one implementation: wall milliseconds, and on the CPU the calling thread's CPU milliseconds."""

    wall_ms: Sequence[float]
    cpu_ms: Sequence[float] | None = None

    @property
    def ms(self) -> float:
        """The median wall-clock milliseconds."""
        return statistics.median(self.wall_ms)

    def columns(self) -> dict[str, Any]:
        """The row's timing columns (see the module's docstring): ms, spread, and on the CPU cpu_ms, repeats_ms."""
        columns: dict[str, Any] = {"ms": self.ms, "spread": (max(self.wall_ms) - min(self.wall_ms)) / self.ms}
        if self.cpu_ms is not None:
            columns["cpu_ms"] = statistics.median(self.cpu_ms)
            columns["repeats_ms"] = [round(ms, 4) for ms in self.wall_ms]
        return columns


def time_cuda(fn: Callable[[], Any]) -> Timing:
    """fn() on the GPU by CUDA events, every repeat of triton.testing.do_bench (warm-up excluded)."""
    import triton.testing

    return Timing(triton.testing.do_bench(fn, return_mode="all"))


def time_cpu(fns: dict[str, Callable[[], Any]], repeats: int = 7, warmup: int = 1) -> dict[str, Timing]:
    """Every repeat of each fn in wall time and in the calling thread's CPU time, measured interleaved (a, b, c, a,
    b, c, ...) so that load on this shared machine hits every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            cpu_start, wall_start = time.thread_time(), time.perf_counter()
            fn()
            wall[name].append((time.perf_counter() - wall_start) * 1e3)
            cpu[name].append((time.thread_time() - cpu_start) * 1e3)
    return {name: Timing(wall[name], cpu[name]) for name in fns}


def time_all(fns: dict[str, Callable[[], Any]], device: str, repeats: int = 7) -> dict[str, Timing]:
    """The timing of each fn on `device`."""
    if device == "cuda":
        return {name: time_cuda(fn) for name, fn in fns.items()}
    return time_cpu(fns, repeats=repeats)


# glibc serves large blocks by mmap and returns them on free, but raises that threshold after the first free, so that
# a freed block may stay resident and be reused unseen by VmHWM; a fixed threshold keeps every block above 64 KiB
# mapped and unmapped, so the resident set follows what is allocated. It takes effect only from a process's start.
PEAK_WORKER_ENV = {
    **os.environ,
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "65536",
    "DETR_FAST_PEAK_WORKER": "1",  # what peak_memory_mib checks: a process started for the measurement
}


def resident_kib(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_memory_mib(fn: Callable[[], object], device: str) -> float | None:
    """MiB that one call of fn allocates at its peak beyond what was allocated before.

    On CUDA: max_memory_allocated minus the allocation before. On the CPU: the peak resident set (VmHWM, reset through
    /proc/self/clear_refs, Linux only) minus the resident set before, which follows the allocations only in a process
    started with PEAK_WORKER_ENV (`worker_peak_mib` starts one); in any other process, or without /proc, None (not
    measured).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if os.environ.get("DETR_FAST_PEAK_WORKER") != "1" or not os.path.exists("/proc/self/clear_refs"):
        return None
    before = resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set
    fn()
    return (resident_kib("VmHWM") - before) / 1024


def worker_peak_mib(command: Sequence[str]) -> float | None:
    """Runs a benchmark's worker `command` (argv) in a fresh process with PEAK_WORKER_ENV and returns the peak_mib of
    the JSON object its last output line prints (None where peak_memory_mib could not measure)."""
    done = subprocess.run(list(command), capture_output=True, text=True, env=PEAK_WORKER_ENV)
    if done.returncode != 0:
        raise RuntimeError(f"worker_peak_mib: {' '.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def verdict(ok: bool | None, noisy: bool = False) -> str:
    """A target line's opening: "PASS:", "FAIL:" or "NOT MEASURED:" (ok None), NOISY beside a measured verdict."""
    if ok is None:
        return "NOT MEASURED:"
    return ("PASS" if ok else "FAIL") + (" (NOISY):" if noisy else ":")


def run_load(info: dict[str, Any]) -> float:
    """The higher of the machine's load at the start and at the end of the run."""
    return max(info["load_start"], info["load_end"])


def noise(info: dict[str, Any], *rows: dict[str, Any]) -> tuple[str, bool]:
    """What a target line quotes of its measurements' noise ("spread 4%/6%; load 1.2 of 2 CPUs"), and whether they
    were noisy: a load (`run_load`) above the CPUs, or a spread above NOISY_SPREAD."""
    load, spreads = run_load(info), [row["spread"] for row in rows]
    spread = "/".join(f"{s:.0%}" for s in spreads) if len(spreads) <= 2 else f"up to {max(spreads):.0%}"
    noisy = load > info["cpus"] or max(spreads) > NOISY_SPREAD
    return f"spread {spread}; load {load:.1f} of {info['cpus']} CPUs", noisy


def times(ratio: float) -> str:
    """A ratio as a target line writes it: 3.2x, 0.67x."""
    return f"{ratio:.1f}x" if ratio >= 1 else f"{ratio:.2f}x"


def speedup_line(
    where: str,
    ours: dict[str, Any] | None,
    peer: dict[str, Any] | None,
    names: tuple[str, str],
    goal: float,
    info: dict[str, Any],
) -> str:
    """The target line "peer's time / ours >= goal" for two rows (None: not measured). A single-threaded CPU run
    (cpu_threads 1) compares thread CPU time, which waiting for a busy core does not inflate, and quotes the wall-time
    ratio beside it; any other run compares wall time."""
    if ours is None or peer is None:
        return f"{verdict(None)} {where}: {names[0]} vs {names[1]} (target >= {goal:.2g}x)"
    by_cpu = info["cpu_threads"] == 1 and "cpu_ms" in ours and "cpu_ms" in peer
    clock = "cpu_ms" if by_cpu else "ms"
    ratio, wall = peer[clock] / ours[clock], peer["ms"] / ours["ms"]
    spread, noisy = noise(info, ours, peer)
    measured = f"{times(ratio)} CPU time (wall {times(wall)}; {spread})" if by_cpu else f"{times(ratio)} ({spread})"
    return (
        f"{verdict(ratio >= goal, noisy)} {where}: {names[0]} {ours[clock]:.3f} ms vs {names[1]} {peer[clock]:.3f} ms"
        f" = {measured} (target >= {goal:.2g}x)"
    )


def report_targets(lines: Sequence[str]) -> int:
    """Print the target lines and return the script's exit status: 1 where a target FAILs (NOT MEASURED is no
    failure), else 0. Call it after writing the results, so that a failing run is still recorded."""
    for line in lines:
        if not TARGET_LINE.match(line):
            raise ValueError(f"a target line opens with PASS:, FAIL: or NOT MEASURED: (NOISY beside it): {line!r}")
        print(line)
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of dicts as a markdown table (columns in first-seen order; lists, the raw repeats, stay in the JSON)."""
    if not rows:
        return "(no rows)\n"
    columns: list[str] = []
    for row in rows:
        columns += [c for c, value in row.items() if c not in columns and not isinstance(value, list)]

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
    implementation, one panel per combination of the other case fields that vary (dtype, mode, B, ...); rows
    without a time are left out.
    Returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [row for row in rows if "ms" in row]  # rows of memory alone have no time to plot
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


def load_line(info: dict[str, Any]) -> str:
    """The markdown's sentence on the machine's load during the run, NOISY where it was above the CPUs."""
    line = (
        f"Machine load (1-minute average): {info['load_start']} at the start, {info['load_end']} at the end, of "
        f"{info['cpus']} CPUs available"
    )
    if run_load(info) > info["cpus"]:
        line += ". NOISY: above the CPUs, the timed code waited for busy cores"
    return line + "."


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
        f.write(load_line(info) + "\n\n")
        if notes:
            f.write(notes.strip() + "\n\n")
        png = plot_results(rows, f"{name} on {info.get('gpu') or 'CPU'}", os.path.join(out, stem + ".png"))
        if png:
            f.write(f"\n![{name}]({os.path.basename(png)})\n")
        f.write(markdown_table(rows))
    print(markdown_table(rows))
    return path
