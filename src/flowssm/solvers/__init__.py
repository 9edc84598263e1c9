"""Flow solvers: one class per file, one interface (:class:`FlowSolver`), one registry."""

from __future__ import annotations

from flowssm.solvers.base import ChunkSolution, FlowSolver, TransferSolver
from flowssm.solvers.euler import Euler
from flowssm.solvers.exact import Exact
from flowssm.solvers.logode import LogODE
from flowssm.solvers.signature import Signature

SOLVERS: dict[str, type[FlowSolver]] = {"exact": Exact, "euler": Euler, "logode": LogODE, "signature": Signature}


def get_solver(spec) -> FlowSolver:
    """A solver from a name (``"exact"``), a mapping (``{"name": "signature", "depth": 3}``, as in YAML)
    or a :class:`FlowSolver` instance."""
    if isinstance(spec, FlowSolver):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if name not in SOLVERS:
            raise ValueError(f"solver: expected one of {sorted(SOLVERS)} (or a FlowSolver), got {name!r}")
        try:
            return SOLVERS[name](**kwargs)
        except TypeError as e:
            raise TypeError(f"solver: bad options {kwargs} for {name!r}: {e}") from None
    raise TypeError(f"solver: expected a name, a mapping or a FlowSolver, got {type(spec).__name__}")


__all__ = [
    "ChunkSolution", "Euler", "Exact", "FlowSolver", "LogODE", "SOLVERS", "Signature", "TransferSolver", "get_solver",
]
