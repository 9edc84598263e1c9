"""The run folder ``out_dir/name``: one run at a time, and starting over without losing the previous run.

* Lock: ``.lock`` holds ``{"pid", "host", "started"}`` (created with ``O_EXCL``). A second run on the folder
  raises :class:`RunFolderBusy` naming the holder; a lock left by a dead process on this host is stale and
  is replaced (with a warning).
* Starting over (``train.resume=false`` on a folder with a saved config): the previous run's files move to
  ``previous-run/`` and are deleted only once the new run has completed its first step (:meth:`commit`).
  A failure before that moves them back; after a kill, the next start of the folder moves them back first.
* A folder this run created is removed again if the run fails before its first step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from flowssm.train import config as config_lib
from flowssm.train.config import ConfigError, RunConfig

LOCK = ".lock"
PREVIOUS = "previous-run"


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""

    exit_code = 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunFolder:
    """Context manager: lock ``out_dir/name``, check or reset its saved config, unlock on exit."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.path = config_lib.check_out_dir(cfg)
        self.lock = self.path / LOCK
        self.previous = self.path / PREVIOUS
        self._created = False
        self._committed = False

    def __enter__(self) -> RunFolder:
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire()
        try:
            self._recover()
            self._prepare()
        except BaseException:
            self._abort()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._committed:
            self._abort()
            return
        self.commit()  # a run that ended normally replaces the previous one even if no step was finite
        self._release()

    def commit(self) -> None:
        """The new run has completed a step: drop the previous run it replaces."""
        if not self._committed:
            shutil.rmtree(self.previous, ignore_errors=True)
            self._committed = True

    # -- lock ------------------------------------------------------------------------------------

    def _acquire(self) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            return
        raise RunFolderBusy(f"{self.lock}: could not take the run folder's lock (another run took it meanwhile)")

    def _check_stale(self) -> None:
        """Remove a lock whose process is dead (same host); otherwise raise :class:`RunFolderBusy`."""
        try:
            holder = json.loads(self.lock.read_text())
            pid, host, started = int(holder["pid"]), str(holder["host"]), holder.get("started", "?")
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - self.lock.stat().st_mtime < 5:  # being written right now
                raise RunFolderBusy(f"{self.path}: another run is starting in this folder ({self.lock})") from None
            pid, host, started = -1, socket.gethostname(), "?"
        if host == socket.gethostname() and not _alive(pid):
            print(f"flowssm: removing the stale lock of dead process {pid} ({self.lock}, started {started})",
                  file=sys.stderr)
            self.lock.unlink(missing_ok=True)
            return
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise RunFolderBusy(
            f"{self.path}: in use by process {pid} on {where} (started {started}); wait for it to finish or choose "
            f"another name=... (if that process is gone, delete {self.lock})"
        )

    def _release(self) -> None:
        try:
            if json.loads(self.lock.read_text()).get("pid") == os.getpid():
                self.lock.unlink()
        except (OSError, ValueError):
            pass

    # -- contents --------------------------------------------------------------------------------

    def _contents(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name not in (LOCK, PREVIOUS)]

    def _recover(self) -> None:
        """An earlier start-over that never completed a step: put the run it replaced back."""
        if not self.previous.exists():
            return
        for p in self._contents():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for p in self.previous.iterdir():
            p.rename(self.path / p.name)
        self.previous.rmdir()
        print(f"flowssm: restored the previous run of {self.path} (a start-over there never completed a step)",
              file=sys.stderr)

    def _prepare(self) -> None:
        """Check the saved config (resume) or move the previous run aside (start over); write ``config.yaml``."""
        cfg, saved = self.cfg, self.path / "config.yaml"
        if saved.exists() and cfg.train.resume:
            old = config_lib.load(saved)
            same_place = dataclasses.replace(old.train, out_dir=cfg.train.out_dir, resume=cfg.train.resume)
            diff = _diff(config_lib.to_dict(dataclasses.replace(old, train=same_place)), config_lib.to_dict(cfg))
            if diff:
                raise ConfigError(
                    f"{diff[0]}: differs from the config saved in {self.path} ({', '.join(diff)}); "
                    "choose another name=..., or pass train.resume=false to start over"
                )
        elif saved.exists():
            self.previous.mkdir()
            for p in self._contents():
                p.rename(self.previous / p.name)
        elif self._contents():
            raise ConfigError(f"name: {self.path} exists and is not a run folder (no config.yaml); choose another name")
        else:
            self._created = True  # empty (or only a stale lock): ours to remove on an early failure
        saved.write_text(config_lib.dump(cfg))

    def _abort(self) -> None:
        """Failure before the first step: undo what this run did to the folder, then unlock."""
        if self.previous.exists():
            self._recover()
        if self._created:
            self._release()
            shutil.rmtree(self.path, ignore_errors=True)
            return
        self._release()


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out
