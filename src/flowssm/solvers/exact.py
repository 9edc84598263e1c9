"""Exact solver: the discrete recurrence on the token grid, via the UT/WY transform."""

from __future__ import annotations

import dataclasses
import math

from flowssm.solvers.base import FlowSolver
from flowssm.solvers.program import Doubling, Merge, Substitution, TransferProgram, Wavefront

PROGRAMS: dict[str, TransferProgram] = {
    "substitution": Substitution(), "merge": Merge(), "doubling": Doubling(), "wavefront": Wavefront(),
}
METHODS = tuple(PROGRAMS)
BLOCKED = ("merge", "substitution")  # the methods with a ``block`` size


@dataclasses.dataclass(frozen=True)
class Exact(FlowSolver):
    """``T = (I + L)^{-1}`` exactly: the (gated) DeltaNet / DeltaProduct recurrence, any rank (order ``inf``).

    ``method="merge"`` (default): recursive block inversion (4-row diagonal blocks merged pairwise up to the
    chunk), as many matmuls as doubling (``2 log2 n - 2``) and no powers of ``L``: stable (float32 relative
    error 1e-6 at mean key cosine 0.88, where substitution gives 1.3e-5).
    ``method="substitution"``: blocked forward substitution (16-row diagonal blocks), sequential over blocks
    (``n / 16`` more dependent matmuls than the merge).
    ``method="doubling"``: ``T = prod_{i < ceil(log2 n)} (I + (-L)^(2^i))``, exact because ``L`` is
    nilpotent; ``2 log2 n`` matmuls and no sequential solve. Numerically unstable for correlated keys:
    the powers ``L^(2^i)`` grow like binomial coefficients of ``n`` and cancel, e.g. float32 relative error
    2e4 at chunk 64 and mean key cosine 0.5 (L2-normalised SiLU features, as in the LM), against 1e-6
    for substitution. Use it only with small chunks or near-orthogonal keys.
    ``method="wavefront"``: the anti-diagonal sweep, ``2n - 3`` row-parallel steps: linear parallel depth.
    ``block``: the diagonal block size of the blocked methods (None: 4 for the merge, 16 for substitution).
    """

    method: str = "merge"
    block: int | None = None
    name = "exact"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Exact(method=...): expected one of {METHODS}, got {self.method!r}")
        if self.block is not None:
            if self.method not in BLOCKED:
                raise ValueError(f"Exact(block=...): only the blocked methods {BLOCKED} take a block size, "
                                 f"got block={self.block!r} with method={self.method!r}")
            self.program()  # the program checks the value

    def order(self) -> float:
        return math.inf

    def program(self) -> TransferProgram:
        program = PROGRAMS[self.method]
        return program if self.block is None else dataclasses.replace(program, block=self.block)
