"""Runner: SIGTERM + resume reproduces an uninterrupted run exactly; data parallelism matches one device;
CLI errors and ``compare``."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowssm.train import config as C
from flowssm.train.cli import main
from flowssm.train.loop import train
from flowssm.train.metrics import MetricsLog

TINY = [
    "model.vocab_size=8", "model.d_model=16", "model.n_layers=1", "model.mlp_hidden=32", "model.mixer.num_heads=2",
    "model.mixer.chunk_size=8", "model.mixer.solver.name=exact", "model.mixer.solver.method=doubling",
    "data.task=parity", "data.seq_len=16", "train.batch_size=4", "train.log_every=1", "train.eval_batches=2",
    "optim.warmup_steps=5",
]


def _records(run_dir: Path, split: str, keys=("step", "loss", "accuracy", "grad_norm", "lr", "final_accuracy")):
    return [{k: r[k] for k in keys if k in r} for r in MetricsLog(run_dir / "metrics.jsonl").read() if r["split"] == split]


def _spawn(tmp_path: Path, name: str, steps: int) -> subprocess.Popen:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"name: {name}\ntrain: {{out_dir: {tmp_path}}}\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    args = [*TINY, f"train.steps={steps}", "train.eval_every=60", "train.checkpoint_every=40"]
    return subprocess.Popen([sys.executable, "-m", "flowssm.train", str(cfg), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_then_resume_reproduces_uninterrupted_run(tmp_path):
    steps = 120  # about 2 s of steps after the first record: the signal lands mid-run
    reference = _spawn(tmp_path, "reference", steps)
    interrupted = _spawn(tmp_path, "resumed", steps)
    log = tmp_path / "resumed" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and '"split": "train"' in log.read_text()):  # past compilation, mid-run
        assert interrupted.poll() is None and time.time() < deadline, interrupted.communicate()[0]
        time.sleep(0.02)
    interrupted.send_signal(signal.SIGTERM)
    out = interrupted.communicate(timeout=120)[0]
    assert interrupted.returncode == 128 + signal.SIGTERM, out
    assert "checkpoint saved" in out
    stopped_at = _records(tmp_path / "resumed", "train")[-1]["step"]
    assert 0 < stopped_at < steps
    assert sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir())[-1] == stopped_at

    resumed = _spawn(tmp_path, "resumed", steps)  # the same command again
    out = resumed.communicate(timeout=180)[0]
    assert resumed.returncode == 0, out
    assert f"resuming {tmp_path / 'resumed'} from step {stopped_at}" in out
    assert reference.wait(timeout=180) == 0, reference.communicate()[0]
    for split in ("train", "val"):
        a, b = _records(tmp_path / "reference", split), _records(tmp_path / "resumed", split)
        assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) > 1
        assert a == b  # bitwise-equal metrics at every step


def test_two_device_data_parallel_matches_one_device(tmp_path):
    losses = {}
    for n in (1, 2):
        cfg = C.load(None, [*TINY, f"name=dp{n}", f"mesh.data={n}", "train.steps=8", "train.eval_every=4",
                            f"train.out_dir={tmp_path}"])
        run = train(cfg)
        losses[n] = _records(run, "train") + _records(run, "val")
        assert (run / "loss.png").exists() and (run / "accuracy.png").exists() and (run / "config.yaml").exists()
        assert C.load(run / "config.yaml") == cfg
    assert [r["step"] for r in losses[1]] == [r["step"] for r in losses[2]]
    for a, b in zip(losses[1], losses[2]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    assert losses[1][0]["loss"] != losses[1][7]["loss"]  # it trained

    info = [r for r in MetricsLog(tmp_path / "dp2" / "metrics.jsonl").read() if r["split"] == "info"]
    assert info[0]["devices"] == 2 and info[0]["chance_accuracy"] == 0.5

    out = tmp_path / "cmp.png"
    assert main(["compare", str(tmp_path / "dp1"), str(tmp_path / "dp2"), "--out", str(out)]) == 0
    assert out.exists()

    # a finished run re-run with the same config trains nothing; a changed config is refused by name
    cfg1 = C.load(tmp_path / "dp1" / "config.yaml")
    before = (tmp_path / "dp1" / "metrics.jsonl").read_text()
    train(cfg1)
    assert (tmp_path / "dp1" / "metrics.jsonl").read_text() == before
    with pytest.raises(C.ConfigError, match=r"optim\.lr: differs from the config saved"):
        train(C.load(tmp_path / "dp1" / "config.yaml", ["optim.lr=0.5"]))


def test_cli_reports_config_errors_by_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dtype: fp8\n")
    assert main(["train", str(path)]) == 2
    assert "model.dtype: expected one of ('float32', 'bfloat16'), got 'fp8'" in capsys.readouterr().err
    assert main(["train", str(path), "model.dtype=bfloat16", "mesh.data=64", "train.batch_size=64",
                 f"train.out_dir={tmp_path}"]) == 2
    assert "mesh.data: expected <= 8" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2


def test_refuses_to_reuse_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(C.ConfigError, match="name: .* is not a run folder"):
        train(C.load(None, [*TINY, "name=notes", f"train.out_dir={tmp_path}"]))
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
