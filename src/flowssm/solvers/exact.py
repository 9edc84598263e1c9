"""Exact solver: the discrete recurrence on the token grid, via the UT/WY transform."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from flowssm.solvers.base import TransferSolver

METHODS = ("substitution", "doubling", "wavefront")


def neumann_doubling(L, num_factors: int):
    """``prod_{i < num_factors} (I + (-L)^(2^i)) = sum_{m < 2^num_factors} (-L)^m`` (powers commute)."""
    n = L.shape[-1]
    eye = jnp.eye(n, dtype=L.dtype)
    power = -L
    T = eye + power
    for _ in range(num_factors - 1):
        power = power @ power
        T = T + T @ power
    return T


def wavefront(L, rhs):
    """``(I + L)^{-1} rhs`` by an anti-diagonal sweep of the ``(i, m)`` grid of the strictly lower ``L``.

    At step ``s`` every row ``i`` takes its single update ``x_i -= L_im x_m`` from the cell ``m = s - i``
    (``m < i``); ``x_m`` is final by then, its own cells ``(m, m')`` lying on anti-diagonals ``< 2m < s``.
    ``2n - 3`` steps of ``O(n D)`` fully parallel work: linear parallel depth (ParallelFlow's sweep), exact.
    """
    n = L.shape[-1]
    rows = jnp.arange(n)

    def step(s, x):
        m = s - rows
        col = jnp.clip(m, 0, n - 1)
        coeff = jnp.where((m >= 0) & (m < rows), L[rows, col], 0.0)
        return x - coeff[:, None] * x[col]

    return jax.lax.fori_loop(1, 2 * n - 2, step, rhs)


@dataclasses.dataclass(frozen=True)
class Exact(TransferSolver):
    """``T = (I + L)^{-1}`` exactly: the (gated) DeltaNet / DeltaProduct recurrence, any rank (no
    truncation error: ``order() = inf``).

    ``method="substitution"``: forward substitution (``solve_triangular``), sequential in ``n``.
    ``method="doubling"``: ``T = prod_{i < ceil(log2 n)} (I + (-L)^(2^i))``, exact because ``L`` is
    nilpotent; ``2 log2 n`` matmuls and no sequential solve.
    ``method="wavefront"``: the anti-diagonal sweep (:func:`wavefront`), ``2n - 3`` steps of
    row-parallel updates: linear parallel depth, no reductions.
    """

    method: str = "substitution"
    name = "exact"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Exact(method=...): expected one of {METHODS}, got {self.method!r}")

    def order(self) -> float:
        return math.inf

    def transfer(self, L, rhs):
        n = L.shape[-1]
        if self.method == "doubling":
            if n == 1:
                return rhs
            return neumann_doubling(L, max(1, math.ceil(math.log2(n)))) @ rhs
        if self.method == "wavefront":
            return wavefront(L, rhs)
        eye = jnp.eye(n, dtype=L.dtype)
        return jax.scipy.linalg.solve_triangular(eye + L, rhs, lower=True, unit_diagonal=True)
