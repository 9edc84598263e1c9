"""The token loop: the definition every chunked solver is checked against (fla's ``naive``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from flowssm.chunks import continuous_cores
from flowssm.paths import Path


def token_update(S, keys, values, beta, alpha, log_decay, semantics: str):
    """Apply one token's affine map to ``S: [K, V]``.

    keys: [R, K], values: [R, V], beta, alpha: [R], log_decay: []. Discrete: ``S <- e^g S`` then ``R``
    Householder-plus-write steps; continuous: the exact flow of the piecewise-linear path over the token.
    """
    S = jnp.exp(log_decay) * S
    if semantics == "discrete":
        for j in range(keys.shape[0]):
            k = keys[j]
            S = S - beta[j] * jnp.outer(k, k @ S) + alpha[j] * jnp.outer(k, values[j])
        return S
    acore, bcore = continuous_cores(keys, beta, alpha, log_decay)
    return S + keys.T @ (acore @ values - bcore @ (keys @ S))


def token_loop(path_bh: Path, q: Float[Array, "T K"], S0: Float[Array, "K V"], scale, semantics: str):
    """One (batch, head): ``o_t = scale S_t^T q_t`` for every token. Returns (o: [T, V], S_T: [K, V])."""

    def step(S, xs):
        qt, kt, vt, bt, at, gt = xs
        S = token_update(S, kt, vt, bt, at, gt, semantics)
        return S, scale * (qt @ S)

    S_final, o = jax.lax.scan(step, S0, (q, *path_bh[:2], path_bh.beta, path_bh.alpha, path_bh.log_decay))
    return o, S_final
