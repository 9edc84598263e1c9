"""The LM benchmark and the kernels' coverage check run end to end on tiny shapes (CPU, interpret mode)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_lm_tiny_row_trains_and_reports(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_lm.py"), "--tiny", "--rows", "flowssm-pallas-remat-2",
           "--steps", "1", "--out", str(tmp_path), "--kernels", '{"output": "kernel"}', "--profile", "1"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert "error" not in row and row["backend"] == "pallas" and row["last_loss"] < row["first_loss"]
    assert row["kernels"] == {"output": "kernel"}  # --kernels reaches the model's mixer config
    assert row["profile"]["ops"] == [] and row["profile"]["busy_ms"] == 0  # traced and read back; no GPU plane


def test_pallas_coverage_check_passes_on_tiny_shapes(tmp_path):
    out = tmp_path / "coverage.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "check_pallas_coverage.py"), "--tiny", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(r["ok"] for r in rows)


def test_document_positions_pack_the_asked_documents_a_row():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_lm import document_positions, family_of

    positions = document_positions(3, 64, documents=5, seed=1)
    starts = positions == 0
    assert positions.shape == (3, 64) and (starts.sum(1) == 5).all() and starts[:, 0].all()
    assert ((positions[:, 1:] == positions[:, :-1] + 1) | starts[:, 1:]).all()
    assert [family_of(n) for n in ("fla-4", "fla-kda-4", "flowssm-pallas-gla-4", "flowssm-pallas-gated-4")] == [
        "deltanet", "kda", "gla", "gated_deltanet"]
