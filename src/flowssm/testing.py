"""Random DeltaNet inputs and error measures, shared by the tests, the demo and the benchmarks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_inputs(seed: int, B: int, T: int, H: int, K: int, V: int, R: int = 1, *, beta_max: float = 2.0,
                  gated: bool = True, dtype=None):
    """fla-layout ``(q, k, v, beta, g, initial_state)`` in ``dtype``; rank ``R`` layout if ``R > 1``.

    q, v, initial_state ~ N(0, 1); unit-norm keys; beta in [0.05, 1] * beta_max; g in [-0.5, 0] (or None).
    Drawn in float64 when x64 is enabled (float32 otherwise), then cast to ``dtype`` (default: the draw
    dtype), so lower precisions are roundings of the same values.
    """
    draw = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    lead = (B, T, H) if R == 1 else (B, T, H, R)
    q = jax.random.normal(ks[0], (B, T, H, K), draw)
    k = jax.random.normal(ks[1], (*lead, K), draw)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (*lead, V), draw)
    beta = jax.random.uniform(ks[3], lead, draw, 0.05, 1.0) * beta_max
    g = -jax.random.uniform(ks[4], (B, T, H), draw, 0.0, 0.5) if gated else None
    s0 = jax.random.normal(ks[5], (B, H, K, V), draw)
    cast = lambda x: None if x is None else x.astype(dtype or draw)
    return tuple(map(cast, (q, k, v, beta, g, s0)))


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` (Frobenius), computed in the widest float available."""
    wide = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    a, b = jnp.asarray(a, wide), jnp.asarray(b, wide)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
