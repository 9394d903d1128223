"""Training throughput on the CPU by thread count, on an idle machine and beside one other busy process.

    python bench/cpu_threads.py [--out DIR] [--steps N]

Each measurement is a fresh process that trains the synthetic preset's model (batches of 32 images of 32 pixels,
as `make demo`; "ms" is the milliseconds of one step) for --steps steps after two warm-up steps, with torch's
threads set to 1, to every available CPU, or to detr_fast's choice (runtime.default_threads: the CPUs other
processes leave free). The "busy" condition runs a pure-Python busy loop in another process meanwhile. More threads
than free cores make the threads wait on each other behind the busy core; the targets check that detr_fast's
choice is within 10 % of the best fixed count in both conditions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
import common  # noqa: E402

WORKER = """
import sys, time, torch
from detr_fast.data.collate import collate
from detr_fast.data.synthetic import CLASSES, SyntheticSpec, render_target
from detr_fast.data.transforms import ToModelInput
from detr_fast.runtime import default_threads
from detr_fast.train import WarmupStepSchedule, build_model, build_optimizer, preset, train_step

threads, steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(default_threads() if threads == "default" else int(threads))
cfg = preset("synthetic")
spec = SyntheticSpec(**cfg.synthetic_spec)
batches = [collate([ToModelInput()(*render_target(b * 32 + i, seed=5, spec=spec), None) for i in range(32)],
                   max_targets=4) for b in range(4)]
model = build_model(cfg, list(CLASSES))
optimizer = build_optimizer(model, cfg)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupStepSchedule(100, 10**9, 0.1))
cpu = torch.device("cpu")
for batch in batches[:2]:
    train_step(model, batch, optimizer, scheduler, 0.1, cpu, None)
start = time.perf_counter()
for step in range(steps):
    train_step(model, batches[step % 4], optimizer, scheduler, 0.1, cpu, None)
print(torch.get_num_threads(), steps * 32 / (time.perf_counter() - start))
"""


def measure(threads: str, steps: int) -> tuple[int, float]:
    """(threads used, images/s) of one fresh training process."""
    done = subprocess.run([sys.executable, "-c", WORKER, threads, str(steps)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the worker failed: {done.stderr[-2000:]}")
    used, images_per_s = done.stdout.split()[-2:]
    return int(used), float(images_per_s)


def main() -> int:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per measurement (default: 60)")
    args = parser.parse_args()
    info = common.environment("cpu")
    cpus = info["cpus"]
    rows = []
    for condition in ("idle", "busy"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
        try:
            time.sleep(1.0 if busy else 0.0)  # let the busy loop take its core
            for choice in dict.fromkeys(["1", str(cpus), "default"]):
                used, images_per_s = measure(choice, args.steps)
                rows.append({"condition": condition, "impl": f"threads={choice}", "ms": 32e3 / images_per_s,
                             "threads": used, "images_per_s": images_per_s})  # fmt: skip
                print(rows[-1], flush=True)
        finally:
            if busy is not None:
                busy.kill()
    common.record_end_load(info)
    lines = []
    for condition in ("idle", "busy"):
        measured = {r["impl"]: r for r in rows if r["condition"] == condition}
        best = max((r for name, r in measured.items() if name != "threads=default"), key=lambda r: r["images_per_s"])
        chosen = measured["threads=default"]
        ok = chosen["images_per_s"] >= 0.9 * best["images_per_s"]
        lines.append(
            f"{common.verdict(ok)} CPU, {condition}: detr_fast's choice ({chosen['threads']} thread(s)) trains at "
            f"{chosen['images_per_s']:.0f} images/s, the best fixed count ({best['impl']}) at "
            f"{best['images_per_s']:.0f} (target >= 90 %)"
        )
    notes = "\n".join(["Targets:", *[f"- {line}" for line in lines]])
    common.write_results("cpu_threads", rows, info, args.out, notes)
    return common.report_targets(lines)


if __name__ == "__main__":
    sys.exit(main())
