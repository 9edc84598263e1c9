"""The LM benchmark and the kernels' coverage check run end to end on tiny shapes (CPU, interpret mode)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_lm_tiny_row_trains_and_reports(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_lm.py"), "--tiny", "--rows", "flowssm-pallas-remat-2",
           "--steps", "1", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert "error" not in row and row["backend"] == "pallas" and row["last_loss"] < row["first_loss"]


def test_pallas_coverage_check_passes_on_tiny_shapes(tmp_path):
    out = tmp_path / "coverage.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "check_pallas_coverage.py"), "--tiny", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(r["ok"] for r in rows)
