"""Checkpoints with orbax, and clean stops on SIGINT/SIGTERM.

A checkpoint holds ``{"params", "opt_state"}`` (arrays) and ``meta`` (JSON: ``step``, ``seed``,
``elapsed`` seconds). Data batches and any randomness are pure functions of ``(seed, step)``, so
``step`` is also the data position and the RNG state: resuming reproduces an uninterrupted run.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved, re-run to resume")
        self.exit_code = 128 + signum


class Checkpoints:
    """The run folder's ``checkpoints/`` (keeps the newest ``max_to_keep``)."""

    def __init__(self, directory: Path, max_to_keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args)
        self.manager.wait_until_finished()

    def restore(self, like: Any) -> tuple[Any, dict]:
        """The latest checkpoint, restored with the structure, dtypes and shardings of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        out = self.manager.restore(self.latest_step(), args=args)
        return out["state"], out["meta"]

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
