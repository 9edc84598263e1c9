"""Random inputs for tests (fla layout), shared by the test modules."""

import jax
import jax.numpy as jnp


def random_inputs(seed, B, T, H, K, V, R=1, *, beta_max=2.0, gated=True, dtype=jnp.float64):
    """q, k (unit norm), v, beta in (0, beta_max], g <= 0 (or None), initial state; rank R if R > 1."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    lead = (B, T, H) if R == 1 else (B, T, H, R)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float64)
    k = jax.random.normal(ks[1], (*lead, K), jnp.float64)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (*lead, V), jnp.float64)
    beta = jax.random.uniform(ks[3], lead, jnp.float64, 0.05, 1.0) * beta_max
    g = -jax.random.uniform(ks[4], (B, T, H), jnp.float64, 0.0, 0.5) if gated else None
    s0 = jax.random.normal(ks[5], (B, H, K, V), jnp.float64)
    cast = lambda x: None if x is None else x.astype(dtype)
    return tuple(map(cast, (q, k, v, beta, g, s0)))


def rel_err(a, b):
    a, b = jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
