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


def diffrax_solve(path_bh: Path, q: Float[Array, "T K"], S0: Float[Array, "K V"], scale, rtol: float = 1e-12):
    """Continuous-time reference: solve ``dS = d omega . S + d xi`` with diffrax.

    The control ``X = (omega, xi)`` is the piecewise-linear interpolation of the cumulative token path,
    ``d omega_t = g_t I - sum_j beta_j k_j k_j^T``, ``d xi_t = sum_j alpha_j k_j v_j^T``, on the grid
    ``0, 1, ..., T``; ``ControlTerm`` contracts the vector field ``S -> [S; I]`` with ``dX``. Independent of
    the flow machinery; meant for small float64 checks. Returns (o: [T, V], S_T: [K, V]).
    """
    import diffrax

    K, V = S0.shape
    T = q.shape[0]
    keys, values = path_bh.keys, path_bh.values
    d_omega = path_bh.log_decay[:, None, None] * jnp.eye(K, dtype=S0.dtype) - jnp.einsum(
        "tj,tjk,tjl->tkl", path_bh.beta, keys, keys
    )
    d_xi = jnp.einsum("tj,tjk,tjv->tkv", path_bh.alpha, keys, values)
    increments = jnp.concatenate([d_omega, d_xi], axis=-1)  # [T, K, K + V]
    X = jnp.concatenate([jnp.zeros_like(increments[:1]), jnp.cumsum(increments, axis=0)])
    ts = jnp.arange(T + 1, dtype=S0.dtype)
    eye_v = jnp.eye(V, dtype=S0.dtype)
    eye_k = jnp.eye(K, dtype=S0.dtype)

    def field(t, S, args):
        return jnp.einsum("ki,jv->kvij", eye_k, jnp.concatenate([S, eye_v], axis=0))

    term = diffrax.ControlTerm(field, diffrax.LinearInterpolation(ts, X))
    controller = diffrax.ClipStepSizeController(diffrax.PIDController(rtol=rtol, atol=rtol), jump_ts=ts)
    sol = diffrax.diffeqsolve(
        term, diffrax.Dopri8(), 0.0, float(T), 0.05, S0, saveat=diffrax.SaveAt(ts=ts[1:]),
        stepsize_controller=controller, max_steps=100_000,
    )
    states = sol.ys  # [T, K, V]
    return scale * jnp.einsum("tk,tkv->tv", q, states), states[-1]
