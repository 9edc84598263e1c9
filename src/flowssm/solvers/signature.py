"""Truncated-signature solver: the Neumann series of ``(I + L)^{-1}`` up to depth ``N``."""

from __future__ import annotations

import dataclasses

from flowssm.solvers.base import FlowSolver
from flowssm.solvers.program import Identity, Neumann, TransferProgram


@dataclasses.dataclass(frozen=True)
class Signature(FlowSolver):
    """``T_N = sum_{m <= N} (-L)^m``: the ``m``-th power collects the order-``(m+1)`` iterated sums.

    Order ``N + 1`` (the truncation leaves ``O(|L|^(N+1))`` in ``T``, one more increment reaches the flow);
    equals ``exact`` once ``N >= n - 1`` (``L`` is nilpotent: deeper series are cut to ``n - 1``) and ``euler`` at ``N = 0``. Matmuls only
    (:class:`~flowssm.solvers.program.Neumann`).
    """

    depth: int = 3
    name = "signature"

    def __post_init__(self):
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"Signature(depth=...): expected an integer >= 0, got {self.depth!r}")

    def order(self) -> float:
        return float(self.depth + 1)

    def program(self) -> TransferProgram:
        return Neumann(self.depth) if self.depth else Identity()
