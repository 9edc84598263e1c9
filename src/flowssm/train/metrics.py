"""Run metrics: a JSONL log (one record per line), plots, and the comparison of several runs.

Records: ``{"split": "info", ...}`` (parameter count, devices, baselines), ``{"split": "train", "step",
"loss", "accuracy", "grad_norm", "lr", "tokens_per_s", "elapsed"}`` and ``{"split": "val", "step", "loss",
"accuracy", ["final_accuracy"], ["bpb"], "elapsed"}``. Loss is in nats per scored token.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from flowssm.solvers import get_solver  # noqa: E402


class MetricsLog:
    """Append-only ``metrics.jsonl``; ``truncate(step)`` drops records past a resumed checkpoint.

    A torn last line (a crash mid-write) is dropped with a warning when read; any other unreadable line
    is an error naming the file and line. ``truncate`` rewrites the file atomically (temporary file, then
    ``os.replace``).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except ValueError as e:
                if number == len(lines):
                    print(f"flowssm: dropping the torn last line {number} of {self.path} ({e})", file=sys.stderr)
                    break
                raise ValueError(f"{self.path}: line {number} is not a JSON record ({e})") from None
            records.append(record)
        return records

    def truncate(self, step: int) -> None:
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _series(records: list[dict], split: str, key: str) -> tuple[list, list]:
    rows = [r for r in records if r.get("split") == split and key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def _info(records: list[dict]) -> dict:
    info: dict = {}
    for r in records:
        if r.get("split") == "info":
            info.update(r)
    return info


def _smooth(ys: list[float]) -> list[float]:
    """Trailing mean over ~5% of the points."""
    w = max(1, len(ys) // 20)
    return [sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1]) for i in range(len(ys))]


def plot_run(run_dir: Path) -> None:
    """``loss.png`` (train and val; bits per byte with the unigram line for LM) and ``accuracy.png``."""
    run_dir = Path(run_dir)
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    info = _info(records)
    lm = "unigram_bpb" in info
    unit = 1 / math.log(2) if lm else 1.0
    fig, ax = plt.subplots(figsize=(6, 4))
    steps, loss = _series(records, "train", "loss")
    ax.plot(steps, [y * unit for y in loss], alpha=0.3, color="C0", label="train")
    ax.plot(steps, [y * unit for y in _smooth(loss)], color="C0", label="train (smoothed)")
    steps, loss = _series(records, "val", "loss")
    ax.plot(steps, [y * unit for y in loss], "o-", color="C1", label="val")
    if lm:
        ax.axhline(info["unigram_bpb"], ls="--", color="gray", label="unigram baseline")
    ax.set(xlabel="step", ylabel="bits per byte" if lm else "loss (nats)", title=run_dir.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, key, style in [("train", "accuracy", "-"), ("val", "accuracy", "o-"), ("val", "final_accuracy", "s--")]:
        steps, acc = _series(records, split, key)
        if steps:
            ax.plot(steps, acc, style, label=f"{split} {key}")
    if "chance_accuracy" in info:
        ax.axhline(info["chance_accuracy"], ls="--", color="gray", label="chance")
    ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title=run_dir.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy.png", dpi=100)
    plt.close(fig)


def summarize(run_dir: Path) -> dict:
    """One row for ``flowssm compare``: the run's config essentials and its last val figures."""
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    info = _info(records)
    val = [r for r in records if r.get("split") == "val"]
    train = [r for r in records if r.get("split") == "train"]
    last = val[-1] if val else {}
    mixer = cfg["model"]["mixer"]
    return {
        "run": run_dir.name,
        "task": cfg["data"]["task"],
        "family": mixer["family"],
        "solver": repr(get_solver(mixer["solver"])),
        "params": info.get("num_params"),
        "step": last.get("step"),
        "train_loss": train[-1]["loss"] if train else None,
        "val_loss": last.get("loss"),
        "val_bpb": last.get("bpb"),
        "unigram_bpb": info.get("unigram_bpb"),
        "val_acc": last.get("accuracy"),
        "val_final_acc": last.get("final_accuracy"),
        "time_s": last.get("elapsed"),
    }


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def compare(run_dirs: list[Path], out: Path) -> str:
    """A Markdown table of the runs (returned) and an overlay of their val/train curves saved to ``out``."""
    rows = [summarize(d) for d in run_dirs]
    keys = [k for k in rows[0] if any(r[k] is not None for r in rows)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, d in enumerate(run_dirs):
        records = MetricsLog(Path(d) / "metrics.jsonl").read()
        steps, loss = _series(records, "train", "loss")
        axes[0].plot(steps, _smooth(loss), color=f"C{i}", label=Path(d).name)
        steps, loss = _series(records, "val", "loss")
        axes[0].plot(steps, loss, "o--", color=f"C{i}", ms=3)
        steps, acc = _series(records, "val", "accuracy")
        axes[1].plot(steps, acc, "o-", color=f"C{i}", label=Path(d).name)
    axes[0].set(xlabel="step", ylabel="loss (nats; solid: train smoothed, dashed: val)")
    axes[1].set(xlabel="step", ylabel="val accuracy", ylim=(0, 1))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return "\n".join(lines)
