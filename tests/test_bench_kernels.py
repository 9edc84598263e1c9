"""The GPU benchmark script runs end to end on a tiny shape (kernels in interpret mode on CPU), so that
what is only ever run on the device machine does not rot between GPU sessions."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
bench_kernels = pytest.importorskip("bench_kernels")


def test_bench_kernels_runs_on_a_tiny_shape(monkeypatch):
    monkeypatch.setattr(bench_kernels, "CHUNK", 16)
    lines = []
    row = bench_kernels.bench_shape((1, 32, 2, 16, 16), reps=1, fla_ok=False, first=True, say=lambda *a: lines.append(a),
                                    xla=False, lean=True, methods=("substitution",))
    assert row["pallas_seq_fwd"] > 0 and row["pallas_seq_fwdbwd"] > 0 and row["pallas_seq_substitution_fwd"] > 0
    assert 0 < row["err_o_correlated_merge"] < 2e-2 and 0 < row["err_o_correlated_substitution"] < 2e-2
    assert set(row["stages"]) >= {"transfer", "state_pass", "output", "state_pass_bwd", "output_bwd", "transfer_bwd"}
    assert "|" in bench_kernels.table([row])


def test_bench_shape_times_the_pallas_rows_with_its_tuning(monkeypatch):
    """``--kernels`` (``bench_shape(tuning=...)``) reaches every pallas row's op."""
    monkeypatch.setattr(bench_kernels, "CHUNK", 16)
    seen, fns = [], bench_kernels.fns
    monkeypatch.setattr(bench_kernels, "fns", lambda gated, **options: (seen.append(options), fns(gated, **options))[1])
    tuning = bench_kernels.Tuning(transfer_mode="f16")
    row = bench_kernels.bench_shape((1, 32, 2, 16, 16), reps=1, fla_ok=False, first=False, say=lambda *a: None,
                                    xla=False, lean=True, scans=("sequential", "auto"), tuning=tuning)
    assert row["pallas_auto_fwdbwd"] > 0 and len(seen) == 4
    assert all(options["tuning"] == tuning for options in seen)


def test_segment_sweep_runs_on_a_tiny_shape(monkeypatch):
    monkeypatch.setattr(bench_kernels, "CHUNK", 16)
    out = bench_kernels.segment_sweep((1, 64, 2, 16, 16), reps=1, say=lambda *a: None, targets=(8,))
    assert out["8"]["segments"] == 4 and out["8"]["fwd"] > 0 and out["8"]["fwdbwd"] > 0



def test_sweep_times_variants_and_compares_their_outputs_and_gradients(monkeypatch):
    monkeypatch.setattr(bench_kernels, "CHUNK", 16)
    Tuning = bench_kernels.Tuning
    variants = (Tuning(), Tuning(output="kernel"), Tuning(transfer_mode="tf32"))
    out = bench_kernels.sweep((1, 32, 2, 16, 16), 1, lambda *a: None, variants, scan="auto")
    assert set(out) == {"default", "output='kernel'", "transfer_mode='tf32'"}
    for label in ("default", "output='kernel'"):  # on CPU both variants run the output kernel
        row = out[label]  # a dict, not the repr of a failure
        assert row["fwd"] > 0 and row["fwdbwd"] > 0 and row["err_o_vs_first"] == row["err_S_vs_first"] == 0.0
        assert row["err_grads_vs_first"] == [0.0] * 4 and 0 < row["err_o_correlated"] < 2e-2
    tf32 = out["transfer_mode='tf32'"]  # TF32 products round differently from the default's (float16)
    assert 0 < tf32["err_o_vs_first"] < 1e-2 and 0 < tf32["err_o_correlated"] < 2e-2


def test_kernel_calls_time_the_mosaic_passes_and_the_fused_output_as_the_op_runs_them():
    """With the Mosaic passes (interpret mode here) and the output fused, the stages are the op's: no output kernel,
    and the backward kernels read the same intermediates as on the Triton passes (same roundings)."""
    q, k, v, beta, g, do = bench_kernels.inputs(0, 1, 128, 2, 64, 64)
    fused = bench_kernels.kernel_calls(q, k, v, beta, g, do, bench_kernels.Tuning(state_lowering="mosaic",
                                                                                   output="fused"))
    triton = bench_kernels.kernel_calls(q, k, v, beta, g, do, bench_kernels.Tuning(state_lowering="triton"))
    assert list(fused) == ["decays", "transfer", "state_pass (output fused)", "state_pass_bwd", "output_bwd",
                           "transfer_bwd"]
    assert "output" in triton and "state_pass" in triton
    run = lambda calls, name: calls[name][0](*calls[name][1])
    for a, b in zip(run(fused, "transfer_bwd"), run(triton, "transfer_bwd")):  # dk, dv, dbeta, dalpha, dg
        assert bench_kernels.rel(a, b) < 1e-5


def test_sweep_tunings_parse_fields_of_every_type():
    default, variant = bench_kernels.tunings("default;state_lowering=triton,block_v=32,segment_programs=None")
    assert default == bench_kernels.Tuning()
    assert variant.changes() == {"state_lowering": "triton", "block_v": 32}


def test_packed_stage_times_run_on_a_tiny_packing(monkeypatch):
    """``--stages packed``: each kernel alone as the op runs it (packed rows read in place, state passes per
    document) and on the unpacked row; 4 documents of 64 tokens, chunk 16 (7 chunks in the layout, 4 unpacked)."""
    monkeypatch.setattr(bench_kernels, "CHUNK", 16)
    out = bench_kernels.packed_stage_times(**bench_kernels.PACKED_TINY, reps=1)
    kernels = {"decays", "transfer", "state_pass", "output", "state_pass_bwd", "output_bwd", "transfer_bwd"}
    assert set(out["packed"]) == kernels and set(out["unpacked"]) == kernels
    assert out["chunks"] == {"packed": 7, "unpacked": 4}
    assert min(out["packed"].values()) > 0


def test_kda_gla_gdn_and_dn_stages_run_once_a_launch_variant(tmp_path, monkeypatch):
    """``--stages kda,gla,gdn,dn --sweep --sweep-tunings 'transfer_warps=4;channel_block=16'``: each kernel alone with
    per-channel decays (delta rule, and linear attention: no transfer kernels), scalar ones (gdn) and none (dn: no
    decays kernel), one entry a variant, labelled by the fields it changes (``stages.json``)."""
    import argparse
    import json

    monkeypatch.setattr(bench_kernels, "CHUNK", 16)
    args = argparse.Namespace(stages="kda,gla,gdn,dn", tiny=True, shapes="0", reps=1, sweep=True, out=str(tmp_path),
                              sweep_tunings=bench_kernels.tunings("transfer_warps=4;channel_block=16"))
    bench_kernels.stages_only(args, say=lambda *a: None)
    variants = {"transfer_warps=4", "channel_block=16"}
    for part in ("kda", "gla", "gdn", "dn"):
        out = json.loads((tmp_path / "stages.json").read_text())[part]
        assert out["shape"] == "1x64x2x16x16" and set(out) == {"shape"} | variants
        for variant in variants:
            assert min(out[variant].values()) > 0
            assert ("transfer_bwd" in out[variant]) == (part != "gla")  # gla: the additive path
            assert ("decays" in out[variant]) == (part != "dn")


def test_profile_op_runs_each_kind_forward_and_backward(capsys):
    """``benchmarks/profile_op.py`` (run under Nsight Compute on the GPU) calls each op once on a tiny shape."""
    profile_op = pytest.importorskip("profile_op")
    for extra in ([], ["--backward"]):
        profile_op.main(["--kinds", "kda,gla,gdn", "--shape", "1x64x2x16x16", *extra])
    assert capsys.readouterr().out.split().count("done") == 6
    with pytest.raises(ValueError, match="--kinds"):
        profile_op.main(["--kinds", "dplr", "--shape", "1x64x2x16x16"])
