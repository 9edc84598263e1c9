"""The one interface every flow solver implements.

A solver maps a chunk's lower-triangular system (:class:`flowssm.chunks.ChunkSystem`) to

* ``w: [n, K]``, ``u: [n, V]``: generators of the corrected values ``u - w S_in``, from which every
  prefix state inside the chunk (and so every output) is read, and
* ``flow``: the chunk flow ``S_in -> P S_in + Q`` that the scan propagates.

Most solvers only choose how to apply ``T = (I + L)^{-1}`` (:class:`TransferSolver`); the flow is then
read off ``(w, u)``. A solver may instead compute its own chunk flow (``logode``).
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

from flowssm.chunks import ChunkSystem
from flowssm.flows import WYFlow


class ChunkSolution(NamedTuple):
    """w: [n, K], u: [n, V] (corrected values ``u - w S_in``); flow: the chunk's flow."""

    w: Float[Array, "n K"]
    u: Float[Array, "n V"]
    flow: WYFlow


class FlowSolver(abc.ABC):
    """Computes one chunk's prefix generators and flow. Subclasses are frozen dataclasses (hashable)."""

    name: str = ""

    @abc.abstractmethod
    def order(self) -> float:
        """Global order in the path increment (local error ``O(|omega|^(order+1))``); ``inf`` if exact."""

    @abc.abstractmethod
    def solve(self, system: ChunkSystem) -> ChunkSolution:
        """Solve one chunk (unbatched: ``n = C R`` micro-steps)."""

    def max_discrete_step(self) -> float | None:
        """Bound ``beta |k|^2 <`` this value that discrete semantics needs (None: any step works)."""
        return None


class TransferSolver(FlowSolver):
    """A solver defined by an approximation of ``T = (I + L)^{-1}`` applied to the right-hand sides."""

    @abc.abstractmethod
    def transfer(self, L: Float[Array, "n n"], rhs: Float[Array, "n D"]) -> Float[Array, "n D"]:
        """``T rhs`` for the strictly lower ``L``."""

    def solve(self, system: ChunkSystem) -> ChunkSolution:
        K = system.rhs_k.shape[-1]
        out = self.transfer(system.L, jnp.concatenate([system.rhs_k, system.rhs_v], axis=-1))
        w, u = out[:, :K], out[:, K:]
        return ChunkSolution(w, u, system.end_flow(w, u))
