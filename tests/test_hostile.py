"""Hostile and mistaken inputs, one test (or more) per case found by trying the project as a new user.

Cases (issue 13): 1 divergence, 2 damaged checkpoints, 3 torn metrics.jsonl, 4 concurrent runs and
starting over, 5 hard resets ``g = -inf``, 6 token ids out of range and foreign decode caches, 7 late or raw
errors, 8 absurd signature depth. Add new cases at the end, with the case they belong to in the name.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import TINY

import flowssm
from flowssm.data import Batch, Task
from flowssm.models import LanguageModel
from flowssm.models.config import MixerConfig, ModelConfig
from flowssm.solvers import Exact, Signature
from flowssm.testing import random_inputs, rel_err
from flowssm.train import config as C
from flowssm.train.checkpoint import CheckpointError, Checkpoints, Diverged
from flowssm.train.cli import main
from flowssm.train.loop import train
from flowssm.train.metrics import MetricsLog, compare
from flowssm.train.rundir import PREVIOUS, RunFolder, RunFolderBusy

F32 = jnp.float32


def _cfg(tmp_path, *overrides):
    return C.load(None, [*TINY, f"train.out_dir={tmp_path}", "train.eval_every=100", *overrides])


def _poison_train_batch(monkeypatch, index: int):
    """Train batch ``index`` scores no position: its loss is 0/0 = NaN (a stand-in for a blow-up)."""
    make = Task.batch

    def poisoned(self, seed, split, i, batch_size):
        b = make(self, seed, split, i, batch_size)
        return b._replace(mask=np.zeros_like(b.mask)) if (split, i) == ("train", index) else b

    monkeypatch.setattr(Task, "batch", poisoned)


# -- 1. divergence -------------------------------------------------------------------------------


def test_case1_nonfinite_step_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    _poison_train_batch(monkeypatch, 4)  # step 5
    config = tmp_path / "c.yaml"
    config.write_text("name: nan\n")
    args = [*TINY, f"train.out_dir={tmp_path}", "train.steps=6", "train.checkpoint_every=2", "train.eval_every=100"]
    assert main(["train", str(config), *args]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss nan" in err and "at step 5" in err and "last checkpoint (step 4) is kept" in err
    run = tmp_path / "nan"
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [2, 4]
    assert not (run / "sample.txt").exists()
    _, _, _, like, _, _ = __import__("flowssm.train.loop", fromlist=["build"]).build(C.load(run / "config.yaml"))
    state, meta = Checkpoints(run / "checkpoints").restore(like)
    assert meta["step"] == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(state))
    assert all(np.isfinite(r["loss"]) for r in MetricsLog(run / "metrics.jsonl").read() if "loss" in r)


def test_case1_skip_policy_drops_the_nonfinite_update_and_counts_it(tmp_path, monkeypatch):
    _poison_train_batch(monkeypatch, 2)  # step 3
    run = train(_cfg(tmp_path, "name=skip", "train.steps=4", "train.on_nonfinite=skip"))
    rows = [r for r in MetricsLog(run / "metrics.jsonl").read() if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert np.isnan(rows[2]["loss"]) and rows[3]["skipped_steps"] == 1 and np.isfinite(rows[3]["loss"])
    with pytest.raises(C.ConfigError, match=r"train.on_nonfinite: expected one of \['stop', 'skip'\], got 'retry'"):
        _cfg(tmp_path, "train.on_nonfinite=retry")


# -- 2. damaged checkpoints ----------------------------------------------------------------------


def _two_checkpoints(tmp_path):
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    state = lambda s: {"params": {"w": jax.random.normal(jax.random.key(s), (64, 64), F32)}, "opt_state": jnp.int32(s)}
    for step in (2, 4):
        checkpoints.save(step, state(step), {"step": step})
    checkpoints.close()
    data = max((p for p in (tmp_path / "checkpoints" / "4").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    return state(2), data


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_case2_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, capsys):
    state2, data = _two_checkpoints(tmp_path)
    raw = bytearray(data.read_bytes())
    if damage == "truncate":
        data.write_bytes(raw[: len(raw) // 2])
    else:
        raw[len(raw) // 2 : len(raw) // 2 + 8] = bytes(b ^ 0xFF for b in raw[len(raw) // 2 : len(raw) // 2 + 8])
        data.write_bytes(raw)
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    state, meta = checkpoints.restore(state2)
    assert meta["step"] == 2 and np.array_equal(state["params"]["w"], state2["params"]["w"])
    assert "checkpoint step 4" in capsys.readouterr().err
    assert checkpoints.manager.all_steps() == [2] and len(list((tmp_path / "damaged-checkpoints").iterdir())) == 1
    checkpoints.save(4, state, {"step": 4})  # the step can be written again
    checkpoints.close()


def test_case2_no_intact_checkpoint_is_an_error_that_moves_nothing(tmp_path):
    state2, data = _two_checkpoints(tmp_path)
    for step in (2, 4):
        meta = tmp_path / "checkpoints" / str(step) / "meta" / "metadata"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "checksum": "0" * 64}))
    with pytest.raises(CheckpointError, match=r"no intact checkpoint \(damaged steps: \[4, 2\]\)"):
        Checkpoints(tmp_path / "checkpoints").restore(state2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
    with pytest.raises(ValueError, match="refusing to checkpoint non-finite values"):
        Checkpoints(tmp_path / "checkpoints").save(6, {"w": jnp.array([jnp.nan])}, {"step": 6})


# -- 3. torn metrics.jsonl -----------------------------------------------------------------------


def test_case3_torn_last_metrics_line_is_dropped_and_the_rewrite_is_atomic(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(C.dump(C.RunConfig()))
    log = MetricsLog(run / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write({"split": "val", "step": step, "loss": 1.0 / step, "accuracy": 0.5})
    with log.path.open("a") as f:
        f.write('{"split": "train", "step": 4, "lo')  # a crash mid-write
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    assert "dropping the torn last line 4" in capsys.readouterr().err
    assert "| run |" in compare([run], tmp_path / "cmp.png")
    log.truncate(2)
    assert log.path.read_text() == "".join(json.dumps(r) + "\n" for r in log.read())
    assert [r["step"] for r in log.read()] == [1, 2] and sorted(os.listdir(run)) == ["config.yaml", "metrics.jsonl"]
    log.path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not a JSON record"):
        log.read()


# -- 4. concurrent runs, starting over -----------------------------------------------------------


def _fake_run(tmp_path, name: str) -> dict:
    """A finished-looking run folder (config, metrics, a checkpoint file); returns its files' bytes."""
    run = tmp_path / name
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "checkpoints" / "2" / "data").write_bytes(b"weights")
    (run / "config.yaml").write_text(C.dump(_cfg(tmp_path, f"name={name}", "train.steps=2")))
    (run / "metrics.jsonl").write_text('{"split": "train", "step": 2, "loss": 1.0}\n')
    return _files(run)


def _files(run) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_case4_a_live_run_locks_its_folder_and_a_stale_lock_is_replaced(tmp_path, capsys):
    before = _fake_run(tmp_path, "locked")
    run = tmp_path / "locked"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename, "started": "t0"}))
        for resume in ("true", "false"):
            with pytest.raises(RunFolderBusy, match=rf"in use by process {live.pid} on this host \(started t0\)"):
                train(_cfg(tmp_path, "name=locked", "train.steps=2", f"train.resume={resume}"))
        assert main(["train", str(run / "config.yaml"), "train.resume=false"]) == 1
        assert f"in use by process {live.pid}" in capsys.readouterr().err
        assert _files(run) == {**before, ".lock": (run / ".lock").read_bytes()}
    finally:
        live.kill()
        live.wait()
    with RunFolder(_cfg(tmp_path, "name=locked", "train.steps=2")) as folder:  # the holder is dead: stale lock
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        folder.commit()
    assert "removing the stale lock of dead process" in capsys.readouterr().err
    assert _files(run) == before


def test_case4_starting_over_keeps_the_previous_run_until_the_new_one_completes_a_step(tmp_path, monkeypatch):
    before = _fake_run(tmp_path, "over")
    run = tmp_path / "over"

    def broken(self, *args):
        raise RuntimeError("the new run dies before its first step")

    monkeypatch.setattr(Task, "batch", broken)
    start_over = _cfg(tmp_path, "name=over", "train.steps=2", "train.resume=false")
    with pytest.raises(RuntimeError, match="dies before its first step"):
        train(start_over)
    assert _files(run) == before and not (run / PREVIOUS).exists()

    (run / PREVIOUS).mkdir()  # a start-over killed (kill -9) before its first step: restored on the next start
    for p in list(run.iterdir()):
        if p.name != PREVIOUS:
            p.rename(run / PREVIOUS / p.name)
    (run / "config.yaml").write_text("half-written")
    with pytest.raises(RuntimeError, match="dies before its first step"):
        train(start_over)
    assert _files(run) == before
    shutil.rmtree(run)
    with pytest.raises(RuntimeError, match="dies before its first step"):
        train(start_over)
    assert not run.exists()  # a folder created by a run that never completed a step is removed


# -- 5. hard resets ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, scan", [("xla", "sequential"), ("xla", "associative"), ("pallas", "sequential"),
                                           ("pallas", "associative")])
def test_case5_minus_inf_log_decay_resets_the_state_exactly(backend, scan):
    q, k, v, beta, g, S0 = random_inputs(0, 1, 24, 2, 8, 8, beta_max=1.0, dtype=F32)
    g = g.at[:, 5, 0].set(-jnp.inf).at[:, 18, :].set(-jnp.inf).at[0, 21, 1].set(-jnp.inf)  # 2 resets in a chunk
    run = lambda backend, *a: flowssm.delta_rule(*a, initial_state=S0, chunk_size=16, scan=scan, backend=backend)
    o, S = run(backend, q, k, v, beta, g)
    o_ref, S_ref = run("reference", q, k, v, beta, g)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5
    # exact reset: outputs from token 18 on do not depend on anything before it
    o_cut, _ = run(backend, q, k.at[:, :18].multiply(-1.0), v.at[:, :18].set(3.0), beta, g)
    assert np.array_equal(o[:, 18:], o_cut[:, 18:])
    if scan == "sequential":
        grads = jax.grad(lambda *a: jnp.sum(jnp.sin(run(backend, *a)[0])), argnums=(0, 1, 2, 3, 4))(q, k, v, beta, g)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in grads)


@pytest.mark.parametrize("solver", ["logode", {"name": "signature", "depth": 2}])
def test_case5_minus_inf_log_decay_with_approximate_solvers_is_finite(solver):
    q, k, v, beta, g, S0 = random_inputs(0, 1, 24, 2, 8, 8, beta_max=0.9, dtype=F32)
    o, S = flowssm.delta_rule(q, k, v, beta, g.at[:, 18, :].set(-jnp.inf), initial_state=S0, chunk_size=16,
                              solver=solver)
    assert bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(S)))


# -- 6. token ids and decode caches --------------------------------------------------------------

MODEL = ModelConfig(vocab_size=8, d_model=16, n_layers=1, mlp_hidden=32, mixer=MixerConfig(num_heads=2, chunk_size=8))


def test_case6_token_ids_outside_the_vocabulary_are_errors():
    model = LanguageModel(MODEL, rngs=nnx.Rngs(0))
    for bad in ([[1, 8]], [[1, -1]]):
        with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, vocab_size=8\)"):
            model(jnp.array(bad))
        with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, vocab_size=8\)"):
            model.generate(jnp.array(bad), 2)
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, vocab_size=8\)"):
        model.decode_step(jnp.array([8, 0]), model.init_cache(2))
    task = Task(C.DataConfig(task="parity", seq_len=16))
    task._make = lambda *a: Batch(np.full((1, 16), 2, np.int32), np.zeros((1, 16), np.int32), np.ones((1, 16), np.float32))
    with pytest.raises(ValueError, match=r"inputs: expected token ids in \[0, 2\) for task 'parity', got ids in \[2, 2\]"):
        task.batch(0, "train", 0, 1)


def test_case6_decode_with_a_foreign_cache_is_an_error():
    model = LanguageModel(MODEL, rngs=nnx.Rngs(0))
    deeper = LanguageModel(dataclasses.replace(MODEL, n_layers=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"cache: expected this model's init_cache\(batch=3\)"):
        model.decode_step(jnp.array([1, 2, 3]), model.init_cache(2))
    with pytest.raises(ValueError, match=r"cache: expected this model's init_cache\(batch=2\) \(stacked over 1 layers"):
        model.decode_step(jnp.array([1, 2]), deeper.init_cache(2))
    logits, _ = model.decode_step(jnp.array([1, 2]), model.init_cache(2))
    assert logits.shape == (2, 8)


# -- 7. late and raw errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("train: {steps: [1,\n", [], r"c.yaml: invalid YAML at line 2, column 1"),
        ("train: !!python/object/apply:os.system [ls]\n", [], r"c.yaml: invalid YAML at line 1, column 8: could not determine a constructor"),
        ("name: x\n", ["train.steps=[1,"], r"train.steps \(override\): invalid YAML"),
        ("name: x\n", [f"train.seed={2**70}"], r"train.seed: expected <= 2\*\*32 - 1"),
        ("name: x\n", ["data.task=lm", "model.vocab_size=256", "data.corpus=pydoc", "data.seq_len=100000"], r"data.seq_len: expected <= \d+ \(the val split of corpus 'pydoc'"),
        ("name: x\n", ["train.out_dir=FILE"], r"train.out_dir: .*file is not a directory"),
    ],
    ids=["bad-yaml", "refused-tag", "bad-override", "huge-seed", "seq-longer-than-corpus", "out-dir-is-a-file"],
)
def test_case7_config_mistakes_exit_2_naming_the_key_and_create_nothing(tmp_path, capsys, text, overrides, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    (tmp_path / "file").write_text("")
    overrides = [o.replace("FILE", str(tmp_path / "file" / "sub")) for o in overrides]
    before = sorted(os.listdir(tmp_path))
    assert main(["train", str(config), *TINY, f"train.out_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config error" in err
    assert __import__("re").search(message, err), err
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_case7_unwritable_out_dir_is_a_config_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["train", str(tmp_path / "none.yaml")]) == 2  # missing file
    config = tmp_path / "c.yaml"
    config.write_text("name: x\n")
    assert main(["train", str(config), f"train.out_dir={locked / 'runs'}"]) == 2
    assert f"train.out_dir: {locked} is not writable" in capsys.readouterr().err


def test_case7_empty_batch_or_heads_and_logode_beta_are_clear_errors():
    q, k, v, beta, g, _ = random_inputs(0, 1, 8, 2, 4, 4, dtype=F32)
    for shape in [(0, 8, 2, 4), (1, 8, 0, 4)]:
        x = jnp.zeros(shape, F32)
        with pytest.raises(ValueError, match="k, v: expected non-empty B, T, H"):
            flowssm.delta_rule(x, x, x, jnp.zeros(shape[:3], F32))
    with pytest.raises(ValueError, match=r"beta: LogODE: discrete semantics needs beta \* \|k\|\^2 < 1"):
        flowssm.delta_rule(q, k, v, jnp.full_like(beta, 1.5), g, solver="logode")


# -- 8. absurd signature depth -------------------------------------------------------------------


def test_case8_signature_depth_beyond_n_minus_1_is_cut_to_exact():
    n = 16
    L = jnp.tril(jax.random.normal(jax.random.key(0), (n, n), F32) * 0.3, -1)
    rhs = jax.random.normal(jax.random.key(1), (n, 3), F32)
    deep, mm = Signature(depth=10_000).program(), lambda a, b: a @ b
    jaxpr = jax.make_jaxpr(lambda L, rhs: deep.apply(L, rhs, mm))(L, rhs)
    assert sum(e.primitive.name == "dot_general" for e in jaxpr.jaxpr.eqns) <= n
    assert rel_err(deep.apply(L, rhs, mm), Exact().program().apply(L, rhs, mm)) < 1e-5
    assert deep.depth_for(n) == n - 1 and deep.depth_for(12) == 11  # the kernels run the same program
