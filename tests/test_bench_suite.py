"""The benchmark suite runs end to end on the CPU and records its results (a JSON, a markdown table, a plot and the
index), shown here with its quickest benchmark."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_suite_writes_results_and_index(tmp_path):
    pytest.importorskip("matplotlib")
    command = [
        sys.executable,
        os.path.join(ROOT, "bench", "suite.py"),
        "--quick",
        "--device",
        "cpu",
        "--repeats",
        "1",
        "--only",
        "qkv_projection",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (record_path,) = tmp_path.glob("qkv_projection-cpu-*.json")
    record = json.loads(record_path.read_text())
    assert record["environment"]["device"] == "cpu" and record["environment"]["torch"]
    assert record["rows"] and all(row["ms"] > 0 for row in record["rows"])
    assert {"detr_fast reference", "cuBLAS (x+pos)@W"} <= {row["impl"] for row in record["rows"]}
    stem = record_path.with_suffix("")
    assert stem.with_suffix(".md").read_text().count("|") > 10
    assert stem.with_suffix(".png").stat().st_size > 1000
    index = (tmp_path / "README.md").read_text()
    assert record_path.name in index and "qkv_projection" in index
