"""Transfer programs: how a chunk's ``T ~ (I + L)^{-1}`` is computed, as data that every backend runs.

A solver returns one program (:meth:`flowssm.solvers.FlowSolver.program`); no backend knows solver
classes. ``L: [n, n]`` is the chunk's strictly lower matrix (:class:`flowssm.chunks.ChunkSystem`).

* The xla path (:func:`solve_system`) applies the program to the right-hand sides ``[rhs_k | rhs_v]``.
* The Pallas transfer kernel forms ``T`` as one tile inside the kernel (:meth:`TransferProgram.matrix`:
  the program applied to the identity, unless it forms ``T`` directly), then ``w = T rhs_k``, ``u = T rhs_v``.

``apply`` uses only ``matmul``, elementwise ops, ``iota`` masks, static Python loops and
``lax.fori_loop``, so one definition runs in XLA and in a Triton kernel; ``matmul`` is the backend's
product (``jnp.matmul`` in XLA, the kernel's float32-accumulating ``dot``).

``structure`` tells the kernels' backward what ``T`` is: ``IDENTITY`` (``T = I``), ``INVERSE``
(``T = (I + L)^{-1}`` exactly: the backward kernel reuses the forward's ``T``) or ``GENERAL`` (the
backward differentiates the jnp reference); ``ADDITIVE`` is ``T = I`` on a path without multiplicative
increments (``beta = 0``): ``w = 0``, which the kernels neither form nor read. ``pallas_unsupported`` says
why the kernels cannot run a program (``None``: they can).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Callable, ClassVar, NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from flowssm.chunks import ChunkSystem
from flowssm.flows import WYFlow

Matmul = Callable[[Array, Array], Array]
IDENTITY, INVERSE, GENERAL, ADDITIVE = "identity", "inverse", "general", "additive"


class ChunkSolution(NamedTuple):
    """w: [n, K], u: [n, V] (corrected values ``u - w S_in``); flow: the chunk's flow."""

    w: Float[Array, "n K"]
    u: Float[Array, "n V"]
    flow: WYFlow


def _iotas(n: int):
    return lax.broadcasted_iota(jnp.int32, (n, n), 0), lax.broadcasted_iota(jnp.int32, (n, n), 1)


def _eye(n: int, dtype):
    row, col = _iotas(n)
    return jnp.where(row == col, 1.0, 0.0).astype(dtype)


def neumann_product(L, factors: int, matmul: Matmul):
    """``prod_{i < factors} (I + (-L)^(2^i)) = sum_{m < 2^factors} (-L)^m`` (the powers commute); ``I`` for 0."""
    T = _eye(L.shape[-1], L.dtype)
    power = -L
    for i in range(factors):
        if i:
            power = matmul(power, power)
        T = T + (power if i == 0 else matmul(T, power))
    return T


@dataclasses.dataclass(frozen=True)
class TransferProgram(abc.ABC):
    """One way of computing ``T rhs`` for a strictly lower ``L``. Subclasses are frozen dataclasses."""

    structure: ClassVar[str] = GENERAL
    pallas_unsupported: ClassVar[str | None] = None

    @abc.abstractmethod
    def apply(self, L: Float[Array, "n n"], rhs: Float[Array, "n D"], matmul: Matmul) -> Float[Array, "n D"]:
        """``T rhs``."""

    def matrix(self, L: Float[Array, "n n"], matmul: Matmul) -> Float[Array, "n n"]:
        """``T`` itself (the kernels' form): ``apply`` to the identity, unless a program forms ``T`` directly."""
        return self.apply(L, _eye(L.shape[-1], L.dtype), matmul)

    def flow(self, system: ChunkSystem, w: Float[Array, "n K"], u: Float[Array, "n V"]) -> WYFlow:
        """The chunk flow; by default read off the generators (``P = e^G I - K~^T w``, ``Q = K~^T u``)."""
        return system.end_flow(w, u)


@dataclasses.dataclass(frozen=True)
class Identity(TransferProgram):
    """``T = I``: every micro-step sees the chunk's incoming state (first order)."""

    structure = IDENTITY

    def apply(self, L, rhs, matmul):
        return rhs


@dataclasses.dataclass(frozen=True)
class Additive(Identity):
    """``T = I`` for a path whose multiplicative steps are 0 (linear attention): ``w = T (b e^G k) = 0``,
    ``u = a v``. The xla interpreter runs it as :class:`Identity` (``w`` comes out 0 from ``b = 0``); the
    kernels skip the transfer and every product with ``w``."""

    structure = ADDITIVE


@dataclasses.dataclass(frozen=True)
class Neumann(TransferProgram):
    """``T_N = sum_{m <= N} (-L)^m`` (``N = depth``): the doubling product when ``N + 1`` is a power
    of two (``log2(N + 1)`` factors), Horner's rule on ``rhs`` otherwise (``N`` matmuls)."""

    depth: int

    def __post_init__(self):
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"Neumann(depth=...): expected an int >= 0, got {self.depth!r}")

    def depth_for(self, n: int) -> int:
        """``min(depth, n - 1)``: ``L`` is ``n x n`` nilpotent, so higher powers vanish (the series is exact)."""
        return min(self.depth, max(n - 1, 0))

    def _factors(self, depth: int) -> int | None:
        terms = depth + 1
        return int(math.log2(terms)) if terms & (terms - 1) == 0 else None

    def matrix(self, L, matmul):
        depth = self.depth_for(L.shape[-1])
        if self._factors(depth) is not None:
            return neumann_product(L, self._factors(depth), matmul)
        eye = _eye(L.shape[-1], L.dtype)
        T = eye
        for i in range(depth):
            T = eye - (L if i == 0 else matmul(L, T))
        return T

    def apply(self, L, rhs, matmul):
        depth = self.depth_for(L.shape[-1])
        if self._factors(depth) is not None:
            return matmul(self.matrix(L, matmul), rhs)
        out = rhs
        for _ in range(depth):
            out = rhs - matmul(L, out)
        return out


@dataclasses.dataclass(frozen=True)
class Doubling(TransferProgram):
    """``T = prod_{i < ceil(log2 n)} (I + (-L)^(2^i))``: exact because ``L^n = 0``; ``2 log2 n`` matmuls."""

    structure = INVERSE

    def matrix(self, L, matmul):
        n = L.shape[-1]
        return neumann_product(L, math.ceil(math.log2(n)) if n > 1 else 0, matmul)

    def apply(self, L, rhs, matmul):
        return matmul(self.matrix(L, matmul), rhs)


@dataclasses.dataclass(frozen=True)
class Substitution(TransferProgram):
    """Blocked forward substitution: ``D^{-1}`` of the ``block x block`` diagonal blocks of ``I + L`` (by
    the doubling product of the block-diagonal part, exact), then block row by block row
    ``x_j = D_jj^{-1} (rhs_j - sum_{c < j} L_jc x_c)``: ``ceil(n / block)`` sequential steps.

    Each step is written on whole tiles (rows outside block ``j`` masked), so one definition serves XLA
    and the Triton kernel; ``block = 1`` is plain forward substitution, ``block >= n`` is doubling.
    """

    block: int = 16
    structure = INVERSE

    def __post_init__(self):
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"Substitution(block=...): expected an int >= 1, got {self.block!r}")

    def apply(self, L, rhs, matmul):
        n = L.shape[-1]
        b = min(self.block, n)
        row, col = _iotas(n)
        diagonal_blocks = jnp.where(row // b == col // b, L, 0.0)
        D_inv = neumann_product(diagonal_blocks, math.ceil(math.log2(b)) if b > 1 else 0, matmul)
        block_of_row = lax.broadcasted_iota(jnp.int32, (n, 1), 0) // b
        x = jnp.zeros_like(rhs)
        for j in range(-(-n // b)):
            x = x + matmul(D_inv, jnp.where(block_of_row == j, rhs - matmul(L, x), 0.0))
        return x


@dataclasses.dataclass(frozen=True)
class Merge(TransferProgram):
    """Recursive block inversion: ``T`` of the ``block x block`` diagonal blocks of ``I + L`` (the doubling
    product of the block-diagonal part, exact), then neighbouring blocks merged, size ``s -> 2 s``, by

        [[A, 0], [C, B]]^{-1} = [[A^{-1}, 0], [-B^{-1} C A^{-1}, B^{-1}]],   i.e.   T <- T - T L_s T

    with ``L_s`` the entries of ``L`` in a ``2s``-block but not an ``s``-block. ``2 log2 n - 2`` products
    for ``n = 2^p`` (as many as doubling; substitution takes ``n / block`` more) and no powers of ``L`` beyond
    the ``block``-sized diagonal blocks: every merged entry is an entry of the exact inverse.
    """

    block: int = 4
    structure = INVERSE

    def __post_init__(self):
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"Merge(block=...): expected an int >= 1, got {self.block!r}")

    def matrix(self, L, matmul):
        n = L.shape[-1]
        b = min(self.block, n)
        row, col = _iotas(n)
        T = neumann_product(jnp.where(row // b == col // b, L, 0.0), math.ceil(math.log2(b)) if b > 1 else 0, matmul)
        s = b
        while s < n:
            merged = jnp.where((row // (2 * s) == col // (2 * s)) & (row // s != col // s), L, 0.0)
            T = T - matmul(T, matmul(merged, T))
            s *= 2
        return T

    def apply(self, L, rhs, matmul):
        return matmul(self.matrix(L, matmul), rhs)


@dataclasses.dataclass(frozen=True)
class Wavefront(TransferProgram):
    """``(I + L)^{-1} rhs`` by the anti-diagonal sweep of the ``(i, m)`` grid (ParallelFlow's sweep).

    At step ``s`` every row ``i`` takes its one update ``x_i -= L_im x_m`` from the cell ``m = s - i < i``;
    ``x_m`` is final by then (its cells lie on anti-diagonals ``< 2m < s``). ``2n - 3`` steps, each fully
    row-parallel: linear parallel depth, exact. A step is one product with the masked anti-diagonal of
    ``L`` (at most one entry a row), the form a tensor-core kernel can run.
    """

    structure = INVERSE

    def apply(self, L, rhs, matmul):
        n = L.shape[-1]
        row, col = _iotas(n)
        step = lambda s, x: x - matmul(jnp.where(row + col == s, L, 0.0), x)
        return lax.fori_loop(1, max(1, 2 * n - 2), step, rhs)


@dataclasses.dataclass(frozen=True)
class MatrixFunction(TransferProgram):
    """Prefix states from the program ``prefix``; the chunk flow from ``chunk_flow(system)``, a matrix
    function of the chunk (e.g. ``exp`` of its log-signature) instead of the flow read off ``(w, u)``."""

    prefix: TransferProgram
    chunk_flow: Callable[[ChunkSystem], WYFlow]
    pallas_unsupported = ("its chunk flow is a matrix function (an n x n expm) of the chunk, while the "
                          "kernels read every chunk flow off the generators (w, u)")

    def apply(self, L, rhs, matmul):
        return self.prefix.apply(L, rhs, matmul)

    def matrix(self, L, matmul):
        return self.prefix.matrix(L, matmul)

    def flow(self, system, w, u):
        return self.chunk_flow(system)


def solve_system(program: TransferProgram, system: ChunkSystem) -> ChunkSolution:
    """The xla interpreter: one chunk's ``(w, u)`` and flow, ``[w | u] = T [rhs_k | rhs_v]``."""
    K = system.rhs_k.shape[-1]
    out = program.apply(system.L, jnp.concatenate([system.rhs_k, system.rhs_v], axis=-1), jnp.matmul)
    w, u = out[:, :K], out[:, K:]
    return ChunkSolution(w, u, program.flow(system, w, u))


__all__ = [
    "ADDITIVE", "Additive", "ChunkSolution", "Doubling", "GENERAL", "IDENTITY", "INVERSE", "Identity", "MatrixFunction",
    "Merge", "Neumann", "Substitution", "TransferProgram", "Wavefront", "neumann_product", "solve_system",
]
