"""Checkpoints with orbax, verified on restore, and clean stops on SIGINT/SIGTERM.

A checkpoint holds ``{"params", "opt_state"}`` (arrays) and ``meta`` (JSON: ``step``, ``seed``,
``elapsed`` seconds, ``checksum``: SHA-256 of the state's leaves). Data batches and any randomness are pure
functions of ``(seed, step)``, so ``step`` is also the data position and the RNG state: resuming
reproduces an uninterrupted run.

Only finite states are saved. Orbax writes each step atomically (a temporary folder renamed when complete,
so a killed save leaves no step behind); on restore the newest step that orbax can read, whose checksum
matches and whose values are finite is used. Newer damaged steps are reported and moved to
``damaged-checkpoints/`` next to ``checkpoints/``.
"""

from __future__ import annotations

import hashlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved, re-run to resume")
        self.exit_code = 128 + signum


class Diverged(RuntimeError):
    """A step had a non-finite loss or gradient under ``train.on_nonfinite=stop``; ``exit_code`` is 3."""

    exit_code = 3

    def __init__(self, step: int, loss: float, grad_norm: float, last_checkpoint: int | None):
        kept = f"the last checkpoint (step {last_checkpoint}) is kept" if last_checkpoint is not None else "no checkpoint yet"
        super().__init__(
            f"non-finite loss {loss} / gradient norm {grad_norm} at step {step}; stopped without applying it, {kept}. "
            "Lower optim.lr (or raise optim.warmup_steps) and re-run to resume, or set train.on_nonfinite=skip"
        )


class CheckpointError(RuntimeError):
    """No checkpoint of the run folder can be restored (every step is damaged)."""

    exit_code = 1


def state_checksum(state: Any) -> str:
    """SHA-256 over the leaves' key paths, dtypes, shapes and bytes (host copies)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def nonfinite_leaves(state: Any) -> list[str]:
    """Key paths of the floating-point leaves holding a NaN or an infinity."""
    return [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf)))
    ]


class Checkpoints:
    """The run folder's ``checkpoints/`` (keeps the newest ``max_to_keep``)."""

    def __init__(self, directory: Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save ``state`` at ``step`` with ``meta`` plus its checksum; a non-finite state is refused."""
        bad = nonfinite_leaves(state)
        if bad:
            raise ValueError(f"state: refusing to checkpoint non-finite values at step {step} (in {bad[:3]})")
        meta = {**meta, "checksum": state_checksum(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args)
        self.manager.wait_until_finished()

    def _restore_step(self, step: int, like: Any) -> tuple[Any, dict]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        state, meta = out["state"], out["meta"]
        if "checksum" in meta and state_checksum(state) != meta["checksum"]:
            raise ValueError("checksum mismatch (the saved arrays changed after they were written)")
        bad = nonfinite_leaves(state)
        if bad:
            raise ValueError(f"non-finite values in {bad[:3]}")
        return state, meta

    def restore(self, like: Any, repair: bool = True) -> tuple[Any, dict]:
        """The newest intact checkpoint, restored with the structure, dtypes and shardings of ``like``.

        Damaged newer steps are reported on stderr and, with ``repair`` (the run's owner, not a reader),
        moved to ``damaged-checkpoints/``; raises :class:`CheckpointError` (moving nothing) when no step is
        intact.
        """
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self._restore_step(step, like)
            except Exception as e:  # orbax/TensorStore read errors, checksum or finite check
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"flowssm: checkpoint step {step} in {self.directory} is damaged: {reason[:300]}", file=sys.stderr)
                damaged.append(step)
                continue
            for bad in damaged if repair else ():
                self._quarantine(bad)
            if damaged:
                print(f"flowssm: resuming from the previous intact checkpoint, step {step}", file=sys.stderr)
            return state, meta
        raise CheckpointError(
            f"{self.directory}: no intact checkpoint (damaged steps: {damaged}); move the folder away to start "
            "over from step 0, or pass train.resume=false"
        )

    def _quarantine(self, step: int) -> None:
        """Move a damaged step to ``damaged-checkpoints/<step>-<time>`` (kept for inspection, out of orbax's way)."""
        path = Path(ocp.path.step.find_step_path(self.directory, ocp.path.step.standard_name_format(), step=step))
        target = self.directory.parent / "damaged-checkpoints" / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}"
        target.parent.mkdir(exist_ok=True)
        path.rename(target)
        print(f"flowssm: moved the damaged step {step} to {target}", file=sys.stderr)
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


class StopSignals:
    """Context manager: SIGINT/SIGTERM set ``self.signum`` instead of killing the process, so the loop
    can finish its step, save and stop. Previous handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> StopSignals:
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
