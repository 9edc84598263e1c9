"""Command line: ``flowssm train CONFIG.yaml [dotted.key=value ...]`` and ``flowssm compare RUN_DIR ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 run or file-system error (one line naming the path or the holder of the run
    folder), 2 config error (nothing created), 3 non-finite step (``train.on_nonfinite=stop``), 128 + signum
    after a signal (checkpoint saved)."""
    parser = argparse.ArgumentParser(prog="flowssm", description="Train flowssm models from YAML configs and compare runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) the run a YAML config describes")
    p.add_argument("config", type=Path, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted.key=value, e.g. model.mixer.solver=signature train.steps=100")
    p = sub.add_parser("compare", help="table and overlay plot of several run folders")
    p.add_argument("runs", nargs="+", type=Path, help="run folders (out_dir/name)")
    p.add_argument("--out", type=Path, default=Path("compare.png"), help="overlay plot path (default: compare.png)")
    args = parser.parse_args(argv)

    from flowssm.train.config import ConfigError

    if args.command == "compare":
        from flowssm.train.metrics import compare

        missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").exists()]
        if missing:
            print(f"flowssm compare: not run folders (no metrics.jsonl): {missing}", file=sys.stderr)
            return 2
        try:
            print(compare(args.runs, args.out))
        except OSError as e:
            return _os_error("compare", e)
        except ValueError as e:
            print(f"flowssm compare: {e}", file=sys.stderr)
            return 1
        print(f"overlay plot: {args.out}")
        return 0

    from flowssm.train import config as config_lib
    from flowssm.train.checkpoint import CheckpointError, Diverged, Interrupted
    from flowssm.train.loop import train
    from flowssm.train.rundir import RunFolderBusy

    try:
        cfg = config_lib.load(args.config, args.overrides)
        config_lib.check_out_dir(cfg)
        run_dir = train(cfg)
    except ConfigError as e:
        print(f"flowssm train: config error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, Diverged, CheckpointError, RunFolderBusy) as e:
        print(f"flowssm train: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        return _os_error("train", e)
    print(f"run folder: {run_dir}")
    return 0


def _os_error(command: str, e: OSError) -> int:
    """A file-system error as one line naming the path; exit status 1."""
    path = f": {e.filename}" if e.filename else ""
    print(f"flowssm {command}: {e.strerror or e}{path}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
