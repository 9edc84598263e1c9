"""The GLA / KDA / DPLR benchmark rows (bench_kernels.py transitions) run end to end on CPU at --tiny."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
bench_transitions = pytest.importorskip("bench_transitions")


def test_transition_rows_run_on_a_tiny_shape(tmp_path):
    (row,) = bench_transitions.main(["--tiny", "--reps", "1", "--kinds", "dplr", "--out", str(tmp_path)])
    assert row["flowssm_fwd"] > 0 and row["flowssm_fwdbwd"] > 0
    assert row["err_o_vs_token_loop"] < 1e-2 and row["err_S_vs_token_loop"] < 1e-2  # bf16 inputs vs float32 loop
    assert (tmp_path / "bench_transitions.json").stat().st_size > 0
    with pytest.raises(ValueError, match="--kinds"):
        bench_transitions.main(["--tiny", "--kinds", "gdn"])
    with pytest.raises(ValueError, match="--tuning: dplr"):
        bench_transitions.main(["--tiny", "--kinds", "dplr", "--tuning", "score_mode=tf32"])


def test_a_kda_row_runs_the_kernels_with_the_given_choices(tmp_path):
    """``--tuning score_mode=tf32``: the row runs KDA on the kernels (interpret mode) with those choices and
    records them."""
    (row,) = bench_transitions.main(["--tiny", "--reps", "1", "--kinds", "kda", "--backend", "pallas",
                                     "--tuning", "score_mode=tf32", "--out", str(tmp_path)])
    assert row["tuning"] == {"score_mode": "tf32"} and row["flowssm_fwd"] > 0
    assert row["err_o_vs_xla"] < 1e-2 and row["err_grad_vs_xla"] < 2e-2
