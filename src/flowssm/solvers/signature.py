"""Truncated-signature solver: the Neumann series of ``(I + L)^{-1}`` up to depth ``N``."""

from __future__ import annotations

import dataclasses
import math

from flowssm.solvers.base import TransferSolver
from flowssm.solvers.exact import neumann_doubling


@dataclasses.dataclass(frozen=True)
class Signature(TransferSolver):
    """``T_N = sum_{m <= N} (-L)^m``: the ``m``-th power collects the order-``(m+1)`` iterated sums.

    Local error ``O(|L|^(N+1))`` (order ``N + 1``); equals ``exact`` once ``N >= n - 1`` (``L`` is
    nilpotent: deeper series are cut to ``n - 1``, see :meth:`effective_depth`) and ``euler`` at
    ``N = 0``. Matmuls only: the doubling product
    ``prod_i (I + (-L)^(2^i))`` when ``N + 1`` is a power of two, Horner's rule otherwise.
    """

    depth: int = 3
    name = "signature"

    def __post_init__(self):
        if not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"Signature(depth=...): expected an integer >= 0, got {self.depth!r}")

    def order(self) -> float:
        return float(self.depth + 1)

    def effective_depth(self, n: int) -> int:
        """``min(depth, n - 1)``: for an ``n x n`` nilpotent ``L`` the higher powers vanish."""
        return min(self.depth, max(n - 1, 0))

    def transfer(self, L, rhs):
        depth = self.effective_depth(L.shape[-1])
        terms = depth + 1
        if terms > 1 and terms & (terms - 1) == 0:
            return neumann_doubling(L, int(math.log2(terms))) @ rhs
        out = rhs
        for _ in range(depth):
            out = rhs - L @ out
        return out
