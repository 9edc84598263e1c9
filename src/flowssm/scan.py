"""Combining chunk flows across the sequence: the state entering every chunk.

* ``sequential``: ``lax.scan`` over chunks carrying ``S`` (``N`` steps of ``K x V`` work, WY flows
  applied without forming ``P``).
* ``associative``: densify each chunk flow and run ``jax.lax.associative_scan`` with
  ``(P2, Q2) o (P1, Q1) = (P2 P1, P2 Q1 + Q2)``: depth ``O(log N)``, extra ``K^3`` work per combine.
* ``auto``: the library chooses by shape. Here (the XLA path) that is ``sequential``; the Pallas path
  chooses its segmented scan when the sequential pass would leave the GPU mostly idle
  (``flowssm.kernels.launch.auto_segments``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from flowssm import flows as F

SCANS = ("auto", "sequential", "associative")


def _combine(earlier: F.DenseFlow, later: F.DenseFlow) -> F.DenseFlow:
    return F.compose(later, earlier)


def chunk_states(chunk_flows: F.WYFlow, S0: Float[Array, "K V"], scan: str):
    """States entering each chunk and the final state.

    chunk_flows: WY flows with a leading chunk axis ``N``; S0: [K, V] -> (S_in: [N, K, V], S_final: [K, V]).
    """
    if scan in ("auto", "sequential"):

        def step(S, flow):
            return F.apply(flow, S), S

        S_final, S_in = jax.lax.scan(step, S0, chunk_flows)
        return S_in, S_final
    if scan == "associative":
        prefix = jax.lax.associative_scan(_combine, F.densify(chunk_flows))
        S_after = F.apply(prefix, S0)  # [N, K, V]: state after each chunk
        S_in = jnp.concatenate([S0[None], S_after[:-1]], axis=0)
        return S_in, S_after[-1]
    raise ValueError(f"scan: expected one of {SCANS}, got {scan!r}")
