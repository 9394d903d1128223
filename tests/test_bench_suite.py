"""The benchmark suite runs end to end on the CPU and records its results where --out says (a JSON, a markdown table,
a plot and the index), never in the repository's bench/results unless asked; rows carry their noise (spread, thread
CPU time) and the environment the machine's load; a target that FAILs makes a script, and so the suite, exit 1."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def load_common():
    """bench/common.py as a module, without putting bench/ on sys.path (its script names are generic)."""
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(BENCH, "common.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


common = load_common()
NAMES = ("linear_assignment", "scipy's loop")
INFO = {"cpu_threads": 1, "cpus": 2, "load_start": 1.2, "load_end": 0.9}
OURS = {"ms": 0.22, "cpu_ms": 0.213, "spread": 0.04}
PEER = {"ms": 0.682, "cpu_ms": 0.686, "spread": 0.06}


def files_of(folder):
    """{path: (size, mtime)} of every file under folder: what a run must leave alone."""
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in pathlib.Path(folder).rglob("*")}


def test_results_default_to_a_folder_in_the_current_directory():
    assert common.parser("a benchmark").parse_args([]).out == "bench-results"


def test_timing_keeps_every_repeat_in_wall_and_thread_cpu_time():
    timing = common.time_cpu({"sum": lambda: sum(range(20_000))}, repeats=3)["sum"]
    columns = timing.columns()
    assert len(columns["repeats_ms"]) == 3 and columns["ms"] == sorted(timing.wall_ms)[1]
    assert columns["cpu_ms"] > 0 and columns["spread"] >= 0


def test_environment_records_the_load_at_the_start_and_the_end():
    info = common.environment("cpu")
    common.record_end_load(info)
    assert info["cpus"] == len(os.sched_getaffinity(0)) and info["load_start"] >= 0 and info["load_end"] >= 0


def test_target_lines_quote_cpu_time_wall_time_spread_and_load():
    assert common.speedup_line("CPU, B=32", OURS, PEER, NAMES, 2, INFO) == (
        "PASS: CPU, B=32: linear_assignment 0.213 ms vs scipy's loop 0.686 ms = 3.2x CPU time "
        "(wall 3.1x; spread 4%/6%; load 1.2 of 2 CPUs) (target >= 2x)"
    )
    multi_threaded = {**INFO, "cpu_threads": 2}
    assert "= 3.1x (spread 4%/6%;" in common.speedup_line("CPU", OURS, PEER, NAMES, 2, multi_threaded)
    assert common.speedup_line("CPU", OURS, None, NAMES, 2, INFO) == (
        "NOT MEASURED: CPU: linear_assignment vs scipy's loop (target >= 2x)"
    )


def test_a_loaded_machine_or_a_wide_spread_says_noisy():
    loaded = {**INFO, "load_end": 2.5}
    assert common.speedup_line("CPU", OURS, PEER, NAMES, 40, loaded).startswith("FAIL (NOISY): ")
    assert "load 2.5 of 2 CPUs" in common.speedup_line("CPU", OURS, PEER, NAMES, 40, loaded)
    spread = {**PEER, "spread": 0.3}
    assert common.speedup_line("CPU", OURS, spread, NAMES, 2, INFO).startswith("PASS (NOISY): ")


def test_the_exit_status_is_1_where_a_target_fails(capsys):
    assert common.report_targets(["PASS: a", "NOT MEASURED: b", "PASS (NOISY): c"]) == 0
    assert common.report_targets(["PASS: a", "FAIL: b", "NOT MEASURED: c"]) == 1
    assert common.report_targets(["FAIL (NOISY): a"]) == 1
    assert "FAIL: b" in capsys.readouterr().out
    with pytest.raises(ValueError, match="opens with PASS"):
        common.report_targets(["- a target: met"])


@pytest.mark.slow
def test_a_failing_target_fails_the_suite(tmp_path):
    """The suite, copied beside a stand-in benchmark whose target FAILs, names it and exits 1."""
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("suite.py", "common.py"):
        shutil.copy(os.path.join(BENCH, name), bench / name)
    (bench / "linear_assignment.py").write_text(
        textwrap.dedent(
            """
            import sys

            import common

            sys.exit(common.report_targets(["FAIL: a target", "NOT MEASURED: another"]))
            """
        )
    )
    command = [sys.executable, str(bench / "suite.py"), "--device", "cpu", "--only", "linear_assignment"]
    done = subprocess.run(command + ["--out", "results"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "FAIL: a target" in done.stdout and "failed: linear_assignment" in done.stdout
    assert (tmp_path / "results" / "README.md").exists()


@pytest.mark.slow
def test_quick_suite_writes_results_and_index_where_out_says(tmp_path):
    pytest.importorskip("matplotlib")
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    recorded = files_of(os.path.join(BENCH, "results"))
    command = [sys.executable, os.path.join(BENCH, "suite.py"), "--quick", "--device", "cpu", "--repeats", "2"]
    command += ["--only", "qkv_projection", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert files_of(os.path.join(BENCH, "results")) == recorded and not list(cwd.iterdir())
    (record_path,) = out.glob("qkv_projection-cpu-*.json")
    record = json.loads(record_path.read_text())
    environment = record["environment"]
    assert environment["device"] == "cpu" and environment["torch"]
    assert {"cpus", "load_start", "load_end"} <= environment.keys()
    rows = record["rows"]
    assert rows and all(row["ms"] > 0 and row["cpu_ms"] > 0 and row["spread"] >= 0 for row in rows)
    assert all(len(row["repeats_ms"]) == 2 for row in rows)
    assert {"detr_fast reference", "cuBLAS (x+pos)@W"} <= {row["impl"] for row in rows}
    stem = record_path.with_suffix("")
    markdown = stem.with_suffix(".md").read_text()
    assert markdown.count("|") > 10 and "Machine load" in markdown and "NOT MEASURED:" in markdown
    assert "| ms | spread | cpu_ms |" in markdown
    assert stem.with_suffix(".png").stat().st_size > 1000
    index = (out / "README.md").read_text()
    assert record_path.name in index and "qkv_projection" in index


def test_the_segmentation_op_benchmarks_run(tmp_path):
    """The mask loss and upsample_add benchmarks, quick: every implementation measured, the targets evaluated."""
    pytest.importorskip("matplotlib")
    command = [sys.executable, os.path.join(BENCH, "suite.py"), "--quick", "--device", "cpu", "--repeats", "1"]
    command += ["--only", "mask_loss", "upsample_add", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    impls = {
        name: {row["impl"] for row in json.loads(next(tmp_path.glob(f"{name}-cpu-*.json")).read_text())["rows"]}
        for name in ("mask_loss", "upsample_add")
    }
    assert impls["mask_loss"] == {"detr_fast", "reference", "reference + torch.compile", "transformers"}
    assert impls["upsample_add"] == {"detr_fast", "upsample + add"}
    markdown = next(tmp_path.glob("mask_loss-cpu-*.md")).read_text()
    assert "CPU mask loss B=2 Q=100 128x160: detr_fast" in markdown


def test_the_segmentation_data_benchmark_checks_masks_against_transformers(tmp_path):
    """Quick: the dataset items and our processor give transformers' pixels and masks (instances and panoptic)."""
    pytest.importorskip("matplotlib")
    command = [sys.executable, os.path.join(BENCH, "segmentation_data.py"), "--quick", "--repeats", "1"]
    done = subprocess.run(command + ["--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(next(tmp_path.glob("segmentation_data-cpu-*.json")).read_text())["rows"]
    assert {row["impl"] for row in rows} == {
        "detr_fast CocoDetection", "detr_fast CocoPanoptic", "detr_fast DetrImageProcessor",
        "transformers DetrImageProcessor",
    }  # fmt: skip
    assert len(rows) == 6 and all(row["same_masks"] and row["same_pixels"] for row in rows)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the resident-set peak is read from /proc")
def test_cpu_peak_memory_counts_what_one_call_allocates(tmp_path):
    """A worker started by worker_peak_mib reports the peak of one call after warm-ups: 16 + 8 MiB live at once (24),
    with 32 MiB held from before not counted (without PEAK_WORKER_ENV's fixed thresholds glibc reuses the warm-ups'
    freed blocks unseen: 16); a process not started for it reports None."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        textwrap.dedent(f"""
        import json, sys
        import torch
        sys.path.insert(0, {BENCH!r})
        from common import peak_memory_mib
        held = torch.ones(8 * 2**20)  # 32 MiB allocated before the call

        def call():
            first = torch.ones(4 * 2**20)  # 16 MiB
            second = torch.ones(2 * 2**20)  # and 8 MiB, both live
            return float(first.sum() + second.sum())

        call(), call()  # warm-ups, as the benchmarks' workers make
        print(json.dumps({{"peak_mib": peak_memory_mib(call, "cpu")}}))
        """)
    )
    peak = common.worker_peak_mib([sys.executable, str(worker)])
    assert 23 <= peak < 28, peak  # 24 MiB less what the allocator had free from before
    plain = {k: v for k, v in os.environ.items() if k not in ("DETR_FAST_PEAK_WORKER", "MALLOC_MMAP_THRESHOLD_")}
    done = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, env=plain, check=True)
    assert json.loads(done.stdout) == {"peak_mib": None}
