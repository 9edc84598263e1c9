"""The training loop, top to bottom: run folder -> data -> mesh -> model and optimiser -> resume ->
jitted step -> loop (log, eval, checkpoint, stop on a signal) -> plots.

Data parallelism: a 1-D mesh of ``mesh.data`` devices; batches are sharded over its ``"data"`` axis,
parameters and optimiser state are replicated, and ``jax.jit`` inserts the gradient all-reduce. The same
config runs on one CPU, forced host devices or several GPUs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from flowssm.data import GROUP_ORDER, Batch, Task
from flowssm.models import LanguageModel
from flowssm.models.config import resolved_backend
from flowssm.train import config as config_lib
from flowssm.train.checkpoint import Checkpoints, Diverged, Interrupted, StopSignals
from flowssm.train.config import ConfigError, OptimConfig, RunConfig
from flowssm.train.metrics import MetricsLog, plot_run
from flowssm.train.rundir import RunFolder


def make_optimizer(cfg: OptimConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping, then AdamW (decay on matrices only) with warmup + cosine schedule."""
    warmup = min(cfg.warmup_steps, steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, steps, cfg.lr * cfg.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw), schedule


def make_mesh(n: int) -> Mesh:
    """A 1-D ``("data",)`` mesh over the first ``n`` devices."""
    devices = jax.devices()
    if n > len(devices):
        raise ConfigError(f"mesh.data: expected <= {len(devices)} (devices available: {devices[0].platform}), got {n}")
    return Mesh(np.array(devices[:n]), ("data",))


def build(cfg: RunConfig):
    """Model and optimiser: (num_params, graphdef, rest, {"params", "opt_state"}, tx, schedule)."""
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    return model.num_params(), graphdef, rest, {"params": params, "opt_state": tx.init(params)}, tx, schedule


def load_model(run_dir: str | Path) -> LanguageModel:
    """The model of a run folder at its last checkpoint (for generation and analysis)."""
    run_dir = Path(run_dir)
    cfg = config_lib.load(run_dir / "config.yaml")
    _, graphdef, rest, like, _, _ = build(cfg)
    checkpoints = Checkpoints(run_dir / "checkpoints")
    if checkpoints.latest_step() is None:
        raise FileNotFoundError(f"run_dir: expected a run folder with checkpoints, got {run_dir} (none saved)")
    state, _ = checkpoints.restore(like, repair=False)
    checkpoints.close()
    return nnx.merge(graphdef, state["params"], rest)


def train(cfg: RunConfig) -> Path:
    """Train (or resume) the run ``cfg`` describes, holding its run folder's lock; returns the run folder.

    Raises :class:`ConfigError` before touching the file system for a bad out_dir or mesh,
    :class:`RunFolderBusy` when another run holds the folder, :class:`Diverged` at a non-finite step
    (``train.on_nonfinite=stop``) and :class:`Interrupted` after saving a checkpoint when SIGINT/SIGTERM arrives.
    """
    config_lib.check_out_dir(cfg)
    make_mesh(cfg.mesh.data)
    with RunFolder(cfg) as folder:
        return _train(cfg, folder)


def _train(cfg: RunConfig, folder: RunFolder) -> Path:
    """The loop of :func:`train` inside the locked run folder; the first verified step commits a start-over."""
    t = cfg.train
    run_dir = folder.path
    log = MetricsLog(run_dir / "metrics.jsonl")

    # data: batch i of a split is a pure function of (seed, split, i)
    task = Task(cfg.data)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    word_problem = cfg.data.task in GROUP_ORDER

    # mesh: batch sharded over "data", everything else replicated
    mesh = make_mesh(cfg.mesh.data)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    put_batch = lambda b: Batch(*(jax.device_put(x, sharded) for x in b))

    # model (float32 master params) and optimiser
    num_params, graphdef, rest, state, tx, schedule = build(cfg)
    state = jax.device_put(state, replicated)

    # resume from the last checkpoint, dropping metrics logged after it
    checkpoints = Checkpoints(run_dir / "checkpoints")
    step, elapsed = 0, 0.0
    if checkpoints.latest_step() is not None:
        state, meta = checkpoints.restore(state)
        step, elapsed = meta["step"], meta["elapsed"]
        log.truncate(step)
        print(f"resuming {run_dir} from step {step}")
    else:
        log.truncate(-1)
        log.write({"split": "info", "step": 0, "num_params": num_params, "devices": cfg.mesh.data,
                   "platform": jax.devices()[0].platform, "backend": resolved_backend(cfg.model),
                   **task.baselines()})

    def loss_fn(params, batch: Batch):
        """Masked mean cross-entropy (nats) and accuracies over the scored positions. The model computes in
        ``model.dtype`` from the float32 master params (its own dtype policy; logits and loss in float32)."""
        nll, correct = nnx.merge(graphdef, params, rest).losses(batch.inputs, batch.targets, positions=batch.positions)
        correct = correct.astype(jnp.float32)
        n = jnp.sum(batch.mask)
        aux = {"accuracy": jnp.sum(correct * batch.mask) / n}
        if word_problem:
            aux["final_accuracy"] = jnp.mean(correct[:, -1])
        return jnp.sum(nll * batch.mask) / n, aux

    @functools.partial(jax.jit, in_shardings=(replicated, sharded), out_shardings=replicated, donate_argnums=0)
    def train_step(state, batch: Batch):
        """One AdamW step; a non-finite loss or gradient leaves ``state`` unchanged (``metrics["finite"]``)."""
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), {"params": params, "opt_state": opt_state}, state)
        return new, {**metrics, "finite": finite}

    @functools.partial(jax.jit, in_shardings=(replicated, sharded), out_shardings=replicated)
    def eval_step(params, batch: Batch):
        loss, aux = loss_fn(params, batch)
        return {"loss": loss, **aux}

    def evaluate() -> None:
        rows = [eval_step(state["params"], put_batch(task.batch(t.seed, "val", i, t.batch_size))) for i in range(t.eval_batches)]
        record = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        if cfg.data.task == "lm":
            record["bpb"] = record["loss"] / math.log(2)
        log.write({"split": "val", "step": step, **record, "elapsed": round(elapsed + time.perf_counter() - start, 3)})
        plot_run(run_dir)

    def save() -> None:
        meta = {"step": step, "seed": t.seed, "elapsed": elapsed + time.perf_counter() - start}
        checkpoints.save(step, state, meta)

    skipped = 0

    def check_finite(at: int, metrics: dict) -> None:
        """``train.on_nonfinite`` for step ``at`` (its update was not applied if it was not finite)."""
        nonlocal skipped
        if bool(metrics["finite"]):
            folder.commit()
            return
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if t.on_nonfinite == "stop":
            raise Diverged(at, loss, grad_norm, checkpoints.latest_step())
        skipped += 1
        tqdm.write(f"flowssm: step {at}: loss {loss}, grad norm {grad_norm}; update skipped ({skipped} so far)")

    start = time.perf_counter()
    if step == 0:
        evaluate()
    bar = tqdm(total=t.steps, initial=step, desc=cfg.name, dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    pending = None  # (step, metrics) not yet checked: checked after the next step is dispatched, no stall
    with StopSignals() as stop, contextlib.closing(checkpoints), contextlib.closing(bar):
        while step < t.steps:
            batch = put_batch(task.batch(t.seed, "train", step, t.batch_size))
            state, metrics = train_step(state, batch)
            step += 1
            window_steps += 1
            bar.update(1)
            if pending is not None:
                check_finite(*pending)
            pending = (step, metrics)
            if (step % t.log_every == 0 or step % t.eval_every == 0 or step % t.checkpoint_every == 0
                    or step == t.steps or stop.signum is not None):
                check_finite(*pending)
                pending = None
            if step % t.log_every == 0 or step == t.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                if skipped:
                    metrics["skipped_steps"] = skipped
                now = time.perf_counter()
                tok_s = window_steps * tokens_per_step / (now - window_start)
                window_start, window_steps = now, 0
                log.write({"split": "train", "step": step, **metrics, "lr": float(schedule(step - 1)),
                           "tokens_per_s": round(tok_s, 1), "elapsed": round(elapsed + now - start, 3)})
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
            if step % t.eval_every == 0 or step == t.steps:
                evaluate()
            if step % t.checkpoint_every == 0 or step == t.steps or stop.signum is not None:
                save()
            if window_steps == 0:  # tokens/s counts training steps only, not eval or checkpoint time
                window_start = time.perf_counter()
            if stop.signum is not None:
                raise Interrupted(stop.signum, step)
    plot_run(run_dir)
    if cfg.data.task == "lm":
        write_sample(nnx.merge(graphdef, state["params"], rest), task, run_dir / "sample.txt", t.seed)
    return run_dir


def write_sample(model: LanguageModel, task: Task, path: Path, seed: int, n: int = 400) -> None:
    """Continue the first 64 validation bytes with ``n`` sampled bytes (temperature 0.8) into ``path``."""
    prompt = task.batch(seed, "val", 0, 1).inputs[:, :64]
    tokens = np.asarray(model.generate(jnp.asarray(prompt), n, temperature=0.8, seed=seed))[0].astype(np.uint8)
    text = lambda b: bytes(b).decode("utf-8", errors="replace")
    path.write_text(f"{text(tokens[:64])}\n---- sampled continuation ----\n{text(tokens[64:])}\n")
