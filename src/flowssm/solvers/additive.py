"""The solver of paths without multiplicative increments (linear attention, GLA)."""

from __future__ import annotations

import dataclasses

from flowssm.solvers.base import FlowSolver, Requirements
from flowssm.solvers.program import Additive as AdditiveProgram


@dataclasses.dataclass(frozen=True)
class Additive(FlowSolver):
    """The exact chunk flow of a path with ``beta = 0``: ``P = e^{G_end}``, ``Q = sum_m e^{G_end - G_m}
    alpha_m k_m v_m^T`` (``T = I``, ``w = 0``).

    :func:`flowssm.linear_attention`'s solver; it is not in the YAML registry, and :func:`flowssm.delta_rule`
    refuses it: on a path with ``beta != 0`` the kernels would drop the multiplicative steps (they do not
    read ``beta``) while the xla path would take them as :class:`~flowssm.solvers.Euler` does.
    """

    name = "additive"

    def order(self) -> float:
        return float("inf")

    def program(self) -> AdditiveProgram:
        return AdditiveProgram()

    def requirements(self) -> Requirements:
        return Requirements(semantics=("discrete",), transitions=("scalar", "per_channel"),
                            conditions=("beta = 0 (no multiplicative increments): the kernels do not read beta",))
