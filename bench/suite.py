"""The benchmark suite: every per-op benchmark and the training step, then an index of all recorded runs.

    python bench/suite.py --quick                 # a CPU pass of about a minute per script, into ./bench-results
    python bench/suite.py --device cuda --out DIR  # the full grids on a GPU (bench/gpu_suite.sh)
    python bench/suite.py --out bench/results      # record into the repository's runs (from its root)
    detr-fast bench [--quick]                      # the same, from the command line

Each script runs in its own process (a crash or an out-of-memory in one does not stop the others) and writes its
JSON, markdown table and plot; the suite then rewrites <out>/README.md, the index of every recorded run there. A
script exits 1 where one of its targets FAILs (or where it crashed); the suite names those scripts and exits 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
import common  # noqa: E402

# In the order a reader meets them: the matcher, the box ops, attention, the projection, the whole step, images in
# and detections out, segmentation results, segmentation data in, then segmentation training: the mask loss, the mask
# head's fusion stage, the segmentation step; last, the DETR descendants of transformers, patched.
SCRIPTS = (
    "linear_assignment",
    "box_ops",
    "attention",
    "qkv_projection",
    "train_step",
    "inference",
    "postprocess",
    "segmentation_data",
    "mask_loss",
    "upsample_add",
    "segmentation",
    "detr_family",
)


def run_scripts(
    device: str, quick: bool, out: str, only: list[str] | None, repeats: int | None
) -> dict[str, tuple[int, float]]:
    """Run each benchmark script; return {name: (exit status, seconds)}."""
    outcome = {}
    for name in only or SCRIPTS:
        command = [sys.executable, os.path.join(BENCH_DIR, f"{name}.py"), "--device", device, "--out", out]
        if quick:
            command.append("--quick")
        if repeats:
            command += ["--repeats", str(repeats)]
        print(f"== {name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        status = subprocess.call(command)
        outcome[name] = (status, time.perf_counter() - start)
        print(
            f"== {name}: {'ok' if status == 0 else f'FAILED (exit {status})'} in {outcome[name][1]:.0f} s", flush=True
        )
    return outcome


def load_of(info: dict) -> str:
    """The machine's load during a run as the index shows it, "1.1-1.4 of 2 CPUs" (blank for older records)."""
    if "load_end" not in info:
        return ""
    return f"{info['load_start']}-{info['load_end']} of {info['cpus']} CPUs"


def write_index(out: str) -> str:
    """Rewrite <out>/README.md: one line per recorded run (benchmark, device, date, versions, load, files)."""
    os.makedirs(out, exist_ok=True)
    entries = []
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        try:
            with open(path) as f:
                record = json.load(f)
            info = record["environment"]
        except (OSError, ValueError, KeyError):
            continue
        stem = os.path.splitext(os.path.basename(path))[0]
        files = [f"[json]({stem}.json)"] + [
            f"[{ext}]({stem}.{ext})" for ext in ("md", "png") if os.path.exists(os.path.join(out, f"{stem}.{ext}"))
        ]
        entries.append(
            {
                "benchmark": record.get("benchmark", stem),
                "device": info.get("gpu") or "CPU",
                "date": info.get("date", ""),
                "torch": info.get("torch"),
                "triton": info.get("triton"),
                "load": load_of(info),
                "rows": len(record.get("rows", [])),
                "files": " ".join(files),
            }
        )
    entries.sort(key=lambda e: (e["date"], e["benchmark"]), reverse=True)
    path = os.path.join(out, "README.md")
    with open(path, "w") as f:
        f.write("# Recorded benchmark runs\n\n")
        f.write(
            "Written by `bench/suite.py` (`detr-fast bench`, `make bench`, `bench/gpu_suite.sh`): newest first. "
            "Each run's markdown holds its environment, the issue's targets next to the measurements, and the "
            "table; its PNG plots time against problem size per implementation.\n\n"
        )
        f.write(common.markdown_table(entries))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=SCRIPTS, help="run these benchmarks only")
    args: argparse.Namespace = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    outcome = run_scripts(args.device, args.quick, out, args.only, args.repeats)
    print(f"index: {write_index(out)}")
    failed = [name for name, (status, _) in outcome.items() if status != 0]
    for name, (status, seconds) in outcome.items():
        print(f"  {name:<18} {'ok' if status == 0 else f'FAILED (exit {status})'} {seconds:6.0f} s")
    if failed:
        print(f"failed: {', '.join(failed)} (a target FAILed or the script crashed: see its output above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
