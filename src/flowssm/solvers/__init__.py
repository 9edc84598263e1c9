"""Flow solvers: one class per file, one interface (:class:`FlowSolver`), one registry.

A solver declares its :class:`~flowssm.solvers.program.TransferProgram` (how every backend computes a
chunk's transfer), its ``order()`` and its ``requirements()``; see :mod:`flowssm.solvers.base`.
"""

from __future__ import annotations

from flowssm.solvers import program
from flowssm.solvers.additive import Additive
from flowssm.solvers.base import FlowSolver, Requirements, check_runnable
from flowssm.solvers.euler import Euler
from flowssm.solvers.exact import Exact
from flowssm.solvers.logode import LogODE
from flowssm.solvers.program import ChunkSolution, TransferProgram
from flowssm.solvers.signature import Signature

SOLVERS: dict[str, type[FlowSolver]] = {"exact": Exact, "euler": Euler, "logode": LogODE, "signature": Signature}


def get_solver(spec, key: str = "solver") -> FlowSolver:
    """A solver from a name (``"exact"``), a mapping (``{"name": "signature", "depth": 3}``, as in YAML)
    or a :class:`FlowSolver` instance (returned as it is). The one place a solver is validated; errors
    name ``key`` (the argument or config key)."""
    if isinstance(spec, FlowSolver):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise TypeError(f"{key}: expected a name, a mapping or a FlowSolver, got {type(spec).__name__}")
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if name not in SOLVERS:
        raise ValueError(f"{key}: expected one of {sorted(SOLVERS)} (or a FlowSolver), got {name!r}")
    try:
        return SOLVERS[name](**kwargs)
    except TypeError as e:
        raise TypeError(f"{key}: bad options {kwargs} for {name!r}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


__all__ = [
    "Additive", "ChunkSolution", "Euler", "Exact", "FlowSolver", "LogODE", "Requirements", "SOLVERS", "Signature",
    "TransferProgram", "check_runnable", "get_solver", "program",
]
