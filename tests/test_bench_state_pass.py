"""The Mosaic-vs-Triton state-pass benchmark runs end to end on its tiny CPU shape (both kernels interpreted),
so that the script only ever run on the GPU does not rot."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
bench_state_pass = pytest.importorskip("bench_state_pass")


def test_bench_state_pass_runs_on_the_tiny_shape(tmp_path):
    result = bench_state_pass.main(["--tiny", "--mosaic", "64:2", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "bench_state_pass.json").read_text())["rows"]
    assert row == result["rows"][0] and set(row["variants"]) == {"triton_bv64_w4_s3", "mosaic_bv64_s2"}
    mosaic = row["variants"]["mosaic_bv64_s2"]
    assert mosaic["ms"] > 0 and mosaic["vs_reference"]["finite"]
    assert mosaic["vs_triton"]["S_in"] < 1e-4 and mosaic["vs_reference"]["S_final"] < 1e-2


def test_bench_state_pass_times_the_segmented_backward_on_the_tiny_shape(tmp_path):
    """``--segments auto`` (4 segments of 1 chunk at the tiny shape): the segmented scan's backward on Triton's
    and on Mosaic's reverse passes, both against the unsegmented reference."""
    result = bench_state_pass.main(["--tiny", "--backward", "64:2", "--segments", "auto", "--out", str(tmp_path)])
    (row,) = result["rows"]
    assert row["shape"] == "1x256x2x64x64 bwd segments=4"
    assert set(row["variants"]) == {"triton_bv64_w4_s3", "mosaic_bv64_s2"}
    triton, mosaic = row["variants"]["triton_bv64_w4_s3"], row["variants"]["mosaic_bv64_s2"]
    assert mosaic["ms"] > 0 and mosaic["vs_reference"]["finite"]
    assert all(triton["vs_reference"][x] < 1e-2 and mosaic["vs_triton"][x] < 1e-4 for x in ("dS_out", "dv", "dS0"))


def test_bench_state_pass_times_the_segment_flows_on_the_tiny_shape(tmp_path):
    """``--flows --segments auto`` (4 segments of 1 chunk at the tiny shape): the segment flows [P | Q] on Triton
    and on Mosaic, against the reference's flows."""
    result = bench_state_pass.main(["--tiny", "--flows", "--mosaic", "64:2", "--segments", "auto",
                                    "--out", str(tmp_path)])
    (row,) = result["rows"]
    assert row["shape"] == "1x256x2x64x64 flows segments=4"
    assert set(row["variants"]) == {"triton_bv64_w4_s3", "mosaic_bv64_s2"}
    triton, mosaic = row["variants"]["triton_bv64_w4_s3"], row["variants"]["mosaic_bv64_s2"]
    assert mosaic["ms"] > 0 and mosaic["vs_reference"]["finite"]
    assert all(triton["vs_reference"][x] < 1e-2 and mosaic["vs_triton"][x] < 1e-4 for x in ("P", "Q"))
