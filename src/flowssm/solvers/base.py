"""The one interface every flow solver implements.

A solver is three declarations about one chunk (:class:`flowssm.chunks.ChunkSystem`):

* :meth:`FlowSolver.program`: how ``T ~ (I + L)^{-1}`` is computed, as a
  :class:`~flowssm.solvers.program.TransferProgram` that every backend runs (the xla path through
  :meth:`FlowSolver.solve`, the Pallas transfer kernel inside the kernel). ``T`` gives the corrected
  values ``u - w S_in`` (every prefix state) and, by default, the chunk flow read off ``(w, u)``.
* :meth:`FlowSolver.order`: the accuracy, in one convention for every solver: global order ``p`` in
  the path increment ``omega``, i.e. a chunk flow with local error ``O(|omega|^(p + 1))``; ``inf`` for
  exact solvers.
* :meth:`FlowSolver.requirements`: the semantics it implements and the conditions it needs of its inputs.

A new solver subclasses :class:`FlowSolver` as a frozen dataclass (its options are its fields) and
runs on every backend that runs its program, without editing flowssm.
"""

from __future__ import annotations

import abc
import dataclasses

from flowssm.chunks import SEMANTICS, ChunkSystem
from flowssm.paths import TRANSITIONS
from flowssm.solvers.program import ChunkSolution, TransferProgram, solve_system


@dataclasses.dataclass(frozen=True)
class Requirements:
    """semantics: the semantics a solver implements; conditions: what it needs of its inputs (checked at
    run time by the solver's program, stated here for users and documentation); max_discrete_step: the
    bound ``beta |k|^2 <`` this value that discrete semantics needs (None: any step), checked when a
    config or layer is built (e.g. refused with ``allow_neg_eigval``); transitions: the path structures
    it runs (:attr:`flowssm.paths.Path.transition`: "scalar", "per_channel", "dplr")."""

    semantics: tuple[str, ...] = SEMANTICS
    transitions: tuple[str, ...] = TRANSITIONS
    conditions: tuple[str, ...] = ()
    max_discrete_step: float | None = None


class FlowSolver(abc.ABC):
    """A chunk solver. Subclasses are frozen dataclasses (hashable: they are static arguments of ``jit``)
    with a class attribute ``name`` (the registry / YAML name)."""

    name: str = ""

    @abc.abstractmethod
    def order(self) -> float:
        """Global order ``p``: the chunk flow's local error is ``O(|omega|^(p + 1))``; ``inf`` if exact."""

    @abc.abstractmethod
    def program(self) -> TransferProgram:
        """How every backend computes the chunk's transfer (and flow)."""

    def requirements(self) -> Requirements:
        """Semantics implemented and input conditions; by default both semantics, no conditions."""
        return Requirements()

    def solve(self, system: ChunkSystem) -> ChunkSolution:
        """One chunk (unbatched: ``n = C R`` micro-steps) on the xla path: the program, interpreted in jnp."""
        return solve_system(self.program(), system)

    def spec(self) -> dict:
        """The mapping :func:`flowssm.solvers.get_solver` builds this solver from (``{"name": ..., **fields}``)."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


def check_runnable(solver: FlowSolver, *, semantics: str, transition: str = "scalar", key: str = "solver") -> None:
    """Reject, before any work, a solver that does not implement ``semantics`` or the path's ``transition``
    (what each backend can run is :mod:`flowssm.backends`' business: it reads
    ``solver.program().pallas_unsupported``). ``key`` names the solver in the error."""
    if semantics not in solver.requirements().semantics:
        raise ValueError(f"semantics: {solver!r} implements {solver.requirements().semantics}, got {semantics!r}")
    if transition not in solver.requirements().transitions:
        raise ValueError(f"{key}: {solver!r} runs transitions {solver.requirements().transitions}, got a "
                         f"{transition!r} path (per-channel g [B, T, H, K] or dplr); use another solver")
