"""Euler solver: one first-order step per chunk."""

from __future__ import annotations

import dataclasses

from flowssm.solvers.base import TransferSolver


@dataclasses.dataclass(frozen=True)
class Euler(TransferSolver):
    """``T = I``: every micro-step sees the chunk's incoming state.

    Chunk flow ``P = e^{G} (I - sum_m beta_m k_m k_m^T)`` (decays integrated exactly, they commute),
    ``Q = sum_m e^{G - G_m} alpha_m k_m v_m^T``: first order, local error ``O(|omega|^2)``.
    Exact when the path has no multiplicative part (linear attention, ``L = 0``).
    """

    name = "euler"

    def order(self) -> float:
        return 1.0

    def transfer(self, L, rhs):
        return rhs
