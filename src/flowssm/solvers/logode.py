"""Log-ODE solver: the chunk flow as the exponential of the truncated log-signature (Magnus).

Decays are folded exactly (they commute with everything but the writes): with ``G_t`` the cumulative
log-decay of token ``t`` and ``G = G_C``, in the frame ``S^ = e^{-G_t} S`` micro-step ``m`` acts on the
augmented state ``[S^; I]`` by ``exp(Y_m)``, its log-increment ``Y_m = [[-b_m k_m k_m^T, k_m A_m v_m^T], [0, 0]]``
(``A`` an ``R x R`` core per token):

* discrete semantics: the exact log of ``S^ -> (I - beta k k^T) S^ + e^{-G_t} alpha k v^T``:
  ``(b, A) = psi (beta, e^{-G_t} alpha)`` with ``psi = -log(1 - x) / x``, ``x = beta |k|^2``; real only
  for ``x < 1`` (``beta < 1`` for unit keys);
* continuous semantics: the exact log of the token flow ``exp([[g I - K^T diag(beta) K, K^T diag(alpha) V], [0, 0]])``:
  ``b = beta``, ``A = e^{-G_t} phi1(-diag(beta) Gram_t)^{-1} Acore_t`` (``Acore`` from
  :func:`flowssm.chunks.continuous_cores`).

The level-2 Magnus generator ``Omega = sum_m Y_m + 1/2 sum_{m' < m} [Y_m, Y_m']`` keeps the low-rank
structure ``Omega = [[-K^T M K, K^T N V], [0, 0]]`` with ``n x n`` cores ``M, N``, so with ``Gram = K K^T``

    P = e^G exp(-K^T M K) = e^G I - K^T (e^G phi1(-M Gram) M K),    Q = e^G K^T (phi1(-M Gram) N V):

one ``n x n`` matrix function per chunk, never a ``K x K`` exponential (``e^G`` is folded into ``A`` as
``e^{G - G_t} <= 1``).
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax.numpy as jnp

from flowssm.chunks import ChunkSystem, block_diagonal, continuous_cores, cumulative_log_decay, phi1
from flowssm.flows import WYFlow
from flowssm.solvers.base import FlowSolver, Requirements
from flowssm.solvers.program import MatrixFunction
from flowssm.solvers.signature import Signature

DISCRETE_BETA_ERROR = (
    "LogODE: discrete semantics needs beta * |k|^2 < 1 (the log of the Householder factor "
    "I - beta k k^T is real only then; beta < 1 for unit keys), got beta * |k|^2 >= 1. "
    "Use semantics='continuous' or another solver for beta in [1, 2]."
)


def _neg_log1m_ratio(x):
    """``-log(1 - x) / x`` for ``0 <= x < 1`` (``1`` at ``x = 0``), smooth through 0."""
    small = x < 1e-4
    xs = jnp.where(small, 0.5, x)
    return jnp.where(small, 1 + x / 2 + x**2 / 3 + x**3 / 4, -jnp.log1p(-xs) / xs)


def log_increments(system: ChunkSystem):
    """Decay-folded log-increments of the chunk's micro-steps, scaled to the chunk end.

    Returns ``b: [n]``, the block-diagonal write core ``A: [n, n]`` times ``e^{G - G_t}``, and
    ``before: [n, n]`` (``before[i, j]``: micro-step ``j`` strictly precedes ``i`` in the ordered
    product; item order for discrete semantics, token order for continuous semantics, where a token's
    ``R`` keys form one generator).
    """
    chunk = system.path
    C, R, _ = chunk.keys.shape
    n = C * R
    G = cumulative_log_decay(chunk.log_decay)
    to_end = jnp.exp(G[-1] - G)  # [C]
    item = jnp.arange(n)
    if system.semantics == "continuous":
        # phi1(-diag(beta) Gram)^{-1} phi1(g I - diag(beta) Gram) diag(alpha): one batched call for both factors
        cores, _ = continuous_cores(
            jnp.stack([chunk.keys, chunk.keys]),
            jnp.stack([chunk.beta, chunk.beta]),
            jnp.stack([chunk.alpha, jnp.ones_like(chunk.alpha)]),
            jnp.stack([chunk.log_decay, jnp.zeros_like(chunk.log_decay)]),
        )
        cores = to_end[:, None, None] * jnp.linalg.solve(cores[1], cores[0])
        token = item // R
        return chunk.beta.reshape(n), block_diagonal(cores), token[:, None] > token[None, :]
    # log(I - beta k k^T) = -psi(x) beta k k^T and phi1(log(1 - x)) = 1 / psi(x), with x = beta |k|^2
    x = chunk.beta.reshape(n) * jnp.sum(system.keys**2, axis=-1)
    psi = _neg_log1m_ratio(eqx.error_if(x, jnp.any(x >= 1), DISCRETE_BETA_ERROR))
    b = psi * chunk.beta.reshape(n)
    a = psi * chunk.alpha.reshape(n) * jnp.repeat(to_end, R)
    return b, jnp.diag(a), item[:, None] > item[None, :]


def magnus_cores(gram, b, A, before):
    """Level-2 Magnus cores: ``Omega_A = -K^T M K``, ``Omega_B = K^T N V``.

    With ``E = diag(b) Gram``: ``M = diag(b) - 1/2 (L_b - L_b^T)``, ``L_b = [j before i] (E diag(b))_ij``;
    ``N = A - 1/2 [j before i] (E A)_ij + 1/2 [i before j] (E A)_ij``.
    """
    E = b[:, None] * gram
    lower = jnp.where(before, E * b[None, :], 0.0)
    M = jnp.diag(b) - 0.5 * (lower - lower.T)
    EA = E @ A
    N = A - 0.5 * jnp.where(before, EA, 0.0) + 0.5 * jnp.where(before.T, EA, 0.0)
    return M, N


@dataclasses.dataclass(frozen=True)
class LogODE(FlowSolver):
    """Log-ODE (Magnus) step: chunk flow ``exp(Omega)``, ``Omega`` the level-``depth`` log-signature.

    Its program is a :class:`~flowssm.solvers.program.MatrixFunction` (xla only). ``depth=2``:
    ``Omega = sum_m Y_m + 1/2 sum_{m'<m} [Y_m, Y_m']``, order 2; ``depth=1`` drops the commutators
    (order 1). Exact when the chunk is one generator (one token under continuous semantics, one rank-1
    step under discrete). ``M``'s symmetric part is
    ``diag(b) >= 0``, so ``||P||_2 <= e^G <= 1``: flows stay bounded over long sequences. Prefix
    states inside the chunk use the matching truncated signature ``Signature(depth - 1)``
    (``T = I - L`` at depth 2). Discrete semantics requires ``beta |k|^2 < 1`` (checked at run time
    with ``equinox.error_if``, also under ``jit``).
    """

    depth: int = 2
    name = "logode"

    def __post_init__(self):
        if self.depth not in (1, 2):
            raise ValueError(f"LogODE(depth=...): expected 1 or 2, got {self.depth!r}")

    def order(self) -> float:
        return float(self.depth)

    def requirements(self) -> Requirements:
        # the decay folding of the module docstring needs a scalar decay, which commutes with K^T M K
        return Requirements(conditions=("discrete semantics: beta |k|^2 < 1 (checked at run time)",),
                            max_discrete_step=1.0, transitions=("scalar",))

    def program(self) -> MatrixFunction:
        return MatrixFunction(prefix=Signature(self.depth - 1).program(), chunk_flow=self.magnus_flow)

    def magnus_flow(self, system: ChunkSystem) -> WYFlow:
        """The chunk flow ``exp(Omega)`` in WY form (module docstring)."""
        b, A, before = log_increments(system)
        if self.depth == 1:
            before = jnp.zeros_like(before)
        keys = system.keys
        gram = keys @ keys.T
        M, N = magnus_cores(gram, b, A, before)
        phi = phi1(-M @ gram)
        G = system.log_decay[-1]
        values = system.path.values.reshape(keys.shape[0], -1)
        return WYFlow(G, keys, jnp.exp(G) * phi @ M @ keys, phi @ N @ values)
