"""The GPU solver-frontier script runs end to end with --tiny (CPU, kernels in interpret mode), so what is
only ever run on the device machine does not rot between GPU sessions."""

import importlib.util
import json
from pathlib import Path

_path = Path(__file__).resolve().parents[1] / "experiments" / "solver_frontier.py"
_spec = importlib.util.spec_from_file_location("solver_frontier", _path)
frontier = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frontier)


def test_frontier_and_training_run_tiny(tmp_path):
    """A pallas solver and an xla-only one (logode), then one budgeted training run; tables, JSON, plots."""
    frontier.main(["--out", str(tmp_path), "--tiny", "--solvers", "euler,logode", "--train-solvers", "euler"])
    rows = json.loads((tmp_path / "frontier.json").read_text())
    assert [(r["solver"], r["backend"]) for r in rows] == [("euler", "pallas"), ("logode", "xla")]
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and 0 < r["err_f32"] < 1 for r in rows)
    (run,) = json.loads((tmp_path / "training.json").read_text())
    assert run["solver"] == "euler" and run["steps"] >= 1 and run["val"][0]["step"] == 0
    assert all(p["bpb"] > 0 and p["seconds"] > 0 for p in run["val"])
    assert "| euler | pallas |" in (tmp_path / "frontier.md").read_text()
    assert "| euler |" in (tmp_path / "training.md").read_text()
    assert (tmp_path / "frontier.png").stat().st_size > 0 and (tmp_path / "training.png").stat().st_size > 0
    (tmp_path / "frontier_gpu2.json").write_text(json.dumps([{**rows[0], "shape": "2x2"}]))  # a second command's rows
    frontier.main(["--out", str(tmp_path), "--part", "render"])
    assert len(json.loads((tmp_path / "frontier.json").read_text())) == 3
    assert "| 2x2 | euler |" in (tmp_path / "frontier.md").read_text()
