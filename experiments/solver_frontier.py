"""The solver frontier on the GPU: time against error for every solver and exact method, then the small
LM trained with four solvers for the same time budget.

    python experiments/solver_frontier.py --out DIR [--part frontier|training|all] [--shapes 0,1]
        [--solvers exact-doubling,euler,...] [--reps 5] [--train-solvers exact,euler,...] [--budget 120]
    python experiments/solver_frontier.py --out DIR --tiny      # tiny shapes, steps and budget (CPU)
    python experiments/solver_frontier.py --out DIR --part render   # tables and plots from DIR's JSON files

Part 1 (``frontier``): on bf16 inputs (``benchmarks/bench_kernels.inputs``: unit keys, beta in (0.5, 0.73),
gated) at 4x4096x16x128x128 and 1x65536x16x128x128 (B x T x H x K x V, chunk 64), each solver on
backend="pallas" where its program runs there, else "xla": median ms of the forward and of
forward+backward (``bench_kernels.fns`` / ``timed``), and the relative error of ``o`` against the exact
solver (xla, float32, highest matmul precision), for the solver run in float32 (its truncation error)
and in bf16 (what the timed call returns). Writes DIR/frontier.json (rows merged by shape and solver,
so shapes and solvers can be run by separate commands), frontier.md and frontier.png.

Part 2 (``training``): ``configs/lm_small_gpu.yaml`` through the runner's Python API, one run per solver,
stopped by SIGINT (the runner's clean stop) once ``--budget`` seconds have passed since the run began
(compile and evaluations included); validation bits/byte every ``--eval-every`` steps against the
runner's ``elapsed`` seconds. Writes DIR/training.json (merged by solver), training.md and training.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_kernels as bench  # noqa: E402

from flowssm.solvers import Euler, Exact, FlowSolver, LogODE, Signature  # noqa: E402
from flowssm.solvers.exact import METHODS  # noqa: E402
from flowssm.train import load, train  # noqa: E402
from flowssm.train.checkpoint import Diverged, Interrupted  # noqa: E402
from flowssm.train.metrics import MetricsLog  # noqa: E402

SOLVERS: dict[str, FlowSolver] = {f"exact-{m}": Exact(method=m) for m in METHODS} | {
    "euler": Euler(), "signature1": Signature(1), "signature2": Signature(2), "signature3": Signature(3),
    "signature7": Signature(7), "logode": LogODE(),
}
TRAIN_SOLVERS = {"exact": Exact(), "euler": Euler(), "signature1": Signature(1), "signature3": Signature(3),
                 "exact-doubling": Exact(method="doubling")}
SHAPES = [(4, 4096, 16, 128, 128), (1, 65536, 16, 128, 128)]
TINY_SHAPES = [(1, 128, 2, 16, 16)]
TRAIN_CONFIG = ROOT / "configs" / "lm_small_gpu.yaml"
TINY_TRAIN = ["model.d_model=32", "model.n_layers=1", "model.mixer.chunk_size=8", "data.seq_len=32",
              "train.batch_size=2", "train.eval_batches=1", "train.log_every=1", "model.dtype=float32"]


def backend_of(solver: FlowSolver) -> str:
    """pallas where the solver's program runs there, else xla."""
    return "xla" if solver.program().pallas_unsupported else "pallas"


def frontier_key(row: dict) -> tuple:
    return row["shape"], row["solver"]


def training_key(row: dict) -> str:
    return row["solver"]


def _merge(path: Path, rows: list[dict], key) -> list[dict]:
    """Rows of ``path`` (if any) with those of the same ``key`` replaced by ``rows``; written back as JSON."""
    old = json.loads(path.read_text()) if path.exists() else []
    new_keys = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new_keys] + rows
    path.write_text(json.dumps(merged, indent=1))
    return merged


def render(out: Path) -> None:
    """Tables and plots from every ``frontier*.json`` / ``training*.json`` in ``out`` (merged in name order:
    results of separate commands copied side by side), written to frontier.json / training.json first."""
    for stem, key, table, plot in (("frontier", frontier_key, frontier_table, plot_frontier),
                                   ("training", training_key, training_table, plot_training)):
        rows = []
        for path in sorted(out.glob(f"{stem}*.json")):
            rows = [r for r in rows if key(r) not in {key(x) for x in json.loads(path.read_text())}]
            rows += json.loads(path.read_text())
        if rows:
            (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
            (out / f"{stem}.md").write_text(table(rows))
            plot(rows, out / f"{stem}.png")


# --- part 1: time against error ---------------------------------------------------------------------


def lm_keys(k):
    """Keys as the LM makes them, L2-normalised SiLU features (mean cosine about 0.5), from ``k``'s noise."""
    x = jax.nn.silu(k.astype(jnp.float32) * k.shape[-1] ** 0.5 + 1.0)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def frontier_rows(shape, labels, reps: int, say=print) -> list[dict]:
    """One row per solver at ``shape``: fwd / fwd+bwd ms (bf16) and relative errors of o vs exact (float32),
    on the benchmark's near-orthogonal unit keys and on correlated :func:`lm_keys`."""
    q, k, v, beta, g, do = bench.inputs(0, *shape)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, beta, g)]
    f32_lm = [f32[0], lm_keys(k), *f32[2:]]
    with jax.default_matmul_precision("highest"):
        o_ref = bench.fns(True, solver=Exact(), backend="xla")[0](*f32)[0]
        o_ref_lm = bench.fns(True, solver=Exact(), backend="xla")[0](*f32_lm)[0]
    rows = []
    for label in labels:
        solver = SOLVERS[label]
        backend = backend_of(solver)
        fwd, fwdbwd = bench.fns(True, solver=solver, backend=backend)
        row = dict(shape="x".join(map(str, shape)), solver=label, backend=backend,
                   fwd_ms=bench.timed(fwd, q, k, v, beta, g, reps=reps),
                   fwdbwd_ms=bench.timed(fwdbwd, q, k, v, beta, g, do, reps=reps),
                   err_bf16=bench.rel(fwd(q, k, v, beta, g)[0], o_ref))
        with jax.default_matmul_precision("highest"):
            row["err_f32"] = bench.rel(fwd(*f32)[0], o_ref)
            row["err_f32_lm_keys"] = bench.rel(fwd(*f32_lm)[0], o_ref_lm)
        say(f"{row['shape']} {label:20s} {backend:6s} fwd {row['fwd_ms']:9.3f} ms  fwd+bwd {row['fwdbwd_ms']:9.3f} ms"
            f"  rel. error f32 {row['err_f32']:.2e}  bf16 {row['err_bf16']:.2e}  f32 LM keys {row['err_f32_lm_keys']:.2e}")
        rows.append(row)
    return rows


def frontier_table(rows: list[dict]) -> str:
    lines = ["| shape | solver | backend | fwd ms | fwd+bwd ms | rel. error of o (float32) | rel. error of o (bf16) "
             "| rel. error, LM keys (float32) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lm = f"{r['err_f32_lm_keys']:.2e}" if "err_f32_lm_keys" in r else "-"
        lines.append(f"| {r['shape']} | {r['solver']} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} "
                     f"| {r['err_f32']:.2e} | {r['err_bf16']:.2e} | {lm} |")
    return "\n".join(lines) + "\n"


def plot_frontier(rows: list[dict], path: Path, floor: float = 1e-8) -> None:
    """Forward+backward ms against float32 error, one panel per shape (errors below ``floor`` drawn at it)."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for r in (r for r in rows if r["shape"] == shape):
            ax.scatter(r["fwdbwd_ms"], max(r["err_f32"], floor), marker="o" if r["backend"] == "pallas" else "s")
            ax.annotate(r["solver"], (r["fwdbwd_ms"], max(r["err_f32"], floor)), fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel="forward+backward ms (bf16)",
               ylabel=f"relative error of o vs exact (float32; floor {floor:g})", title=shape)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_frontier(out: Path, shapes, labels, reps: int) -> list[dict]:
    rows = []
    for shape in shapes:
        rows = _merge(out / "frontier.json", frontier_rows(shape, labels, reps), frontier_key)
    (out / "frontier.md").write_text(frontier_table(rows))
    plot_frontier(rows, out / "frontier.png")
    return rows


# --- part 2: validation bits/byte against seconds ----------------------------------------------------


def train_for(solver: FlowSolver, label: str, budget: float, out: Path, overrides) -> dict:
    """Train ``TRAIN_CONFIG`` with ``solver`` until ``budget`` seconds have passed; the val curve."""
    cfg = load(TRAIN_CONFIG, [*overrides, f"name=frontier_{label}", f"train.out_dir={out / 'runs'}",
                              "train.resume=false", f"model.mixer.solver={json.dumps(solver.spec())}"])
    metrics = Path(cfg.train.out_dir) / cfg.name / "metrics.jsonl"
    started, done = time.perf_counter(), threading.Event()

    def stop_when_due():
        """SIGINT once the budget is spent and the loop is running (its first train record is written)."""
        while not done.wait(0.1):
            running = any(r["split"] == "train" for r in MetricsLog(metrics).read())
            if running and time.perf_counter() - started >= budget:
                os.kill(os.getpid(), signal.SIGINT)
                return

    watcher = threading.Thread(target=stop_when_due, daemon=True)
    watcher.start()
    diverged = None
    try:
        train(cfg)
    except Interrupted:
        pass
    except Diverged as e:  # a result too: the solver's run stops with a non-finite loss at this step
        diverged = str(e)
    finally:
        done.set()
        watcher.join()
    records = MetricsLog(metrics).read()
    val = [dict(step=r["step"], seconds=r["elapsed"], bpb=r["bpb"]) for r in records if r["split"] == "val"]
    tok_s = [r["tokens_per_s"] for r in records if r["split"] == "train"][1:]  # the first window holds the compile
    return dict(solver=label, spec=solver.spec(), backend=cfg.model.mixer.backend, budget_s=budget, val=val,
                steps=max(r["step"] for r in records), tokens_per_s=sum(tok_s) / len(tok_s) if tok_s else math.nan,
                diverged=diverged)


def training_table(runs: list[dict]) -> str:
    lines = ["| solver | backend | budget s | steps | train tokens/s | last val bpb (at s) | best val bpb | diverged |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        last = r["val"][-1]
        diverged = r.get("diverged") or "no"
        lines.append(f"| {r['solver']} | {r['backend']} | {r['budget_s']:g} | {r['steps']} | {r['tokens_per_s']:,.0f} "
                     f"| {last['bpb']:.4f} ({last['seconds']:.0f}) | {min(p['bpb'] for p in r['val']):.4f} "
                     f"| {diverged.split(';')[0]} |")
    return "\n".join(lines) + "\n"


def plot_training(runs: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in runs:
        ax.plot([p["seconds"] for p in r["val"]], [p["bpb"] for p in r["val"]], marker=".", label=r["solver"])
    ax.set(xlabel="seconds since the run began (compile and evaluations included)", ylabel="validation bits/byte")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_training(out: Path, labels, budget: float, overrides) -> list[dict]:
    runs = []
    for label in labels:
        runs = _merge(out / "training.json", [train_for(TRAIN_SOLVERS[label], label, budget, out, overrides)],
                      training_key)
    (out / "training.md").write_text(training_table(runs))
    plot_training(runs, out / "training.png")
    return runs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--part", choices=("frontier", "training", "all", "render"), default="all",
                   help="render: tables and plots from the JSON files already in --out")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, model and budget (runs on CPU)")
    p.add_argument("--shapes", default=None, help=f"indices into {SHAPES} (default: all)")
    p.add_argument("--solvers", default=",".join(SOLVERS), help="part 1 solvers, of: " + ",".join(SOLVERS))
    p.add_argument("--reps", type=int, default=5, help="timing batches of 10 calls each (median)")
    p.add_argument("--train-solvers", default=",".join(TRAIN_SOLVERS), help="of: " + ",".join(TRAIN_SOLVERS))
    p.add_argument("--budget", type=float, default=120.0, help="seconds of training per solver")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--backend", default="pallas" if jax.default_backend() == "gpu" else "xla",
                   help="backend of the trained LM's mixers (default: pallas on a GPU, xla elsewhere)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    def choose(text: str, known: dict) -> list[str]:
        labels = [s for s in text.split(",") if s]
        if not labels or any(s not in known for s in labels):
            p.error(f"expected comma-separated labels of {list(known)}, got {text!r}")
        return labels

    shapes = TINY_SHAPES if args.tiny else [SHAPES[int(i)] for i in (args.shapes or "0,1").split(",")]
    reps, budget, eval_every = (1, 2.0, 2) if args.tiny else (args.reps, args.budget, args.eval_every)
    overrides = (TINY_TRAIN if args.tiny else []) + [f"train.eval_every={eval_every}", f"model.mixer.backend={args.backend}"]
    if args.part == "render":
        render(args.out)
    if args.part in ("frontier", "all"):
        run_frontier(args.out, shapes, choose(args.solvers, SOLVERS), reps)
    if args.part in ("training", "all"):
        run_training(args.out, choose(args.train_solvers, TRAIN_SOLVERS), budget, overrides)


if __name__ == "__main__":
    main()
