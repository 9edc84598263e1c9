"""Euler solver: one first-order step per chunk."""

from __future__ import annotations

import dataclasses

from flowssm.solvers.base import FlowSolver
from flowssm.solvers.program import Identity


@dataclasses.dataclass(frozen=True)
class Euler(FlowSolver):
    """``T = I``: every micro-step sees the chunk's incoming state. Order 1.

    Chunk flow ``P = e^{G} (I - sum_m beta_m k_m k_m^T)`` (decays integrated exactly, they commute),
    ``Q = sum_m e^{G - G_m} alpha_m k_m v_m^T``. Exact when the path has no multiplicative part
    (linear attention, ``L = 0``).
    """

    name = "euler"

    def order(self) -> float:
        return 1.0

    def program(self) -> Identity:
        return Identity()
