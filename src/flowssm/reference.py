"""The token loop: the definition every chunked solver is checked against (fla's ``naive``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from flowssm.chunks import continuous_cores
from flowssm.flows import DenseFlow, apply
from flowssm.paths import Path


def token_update(S, keys, values, beta, alpha, log_decay, semantics: str, right_keys=None):
    """Apply one token's affine map to ``S: [K, V]``.

    keys: [R, K], values: [R, V], beta, alpha: [R], log_decay: [] or [K], right_keys: None or [R, K].
    Discrete: ``S <- diag(e^g) S`` then ``R`` Householder-plus-write steps (with reading keys ``r``: ``R``
    steps ``S <- D S + k (alpha v - beta r^T S)^T``, ``D = diag(e^g)`` for the first, ``I`` after);
    continuous: the exact flow of the piecewise-linear path over the token.
    """
    decay = jnp.exp(log_decay)[:, None] if log_decay.ndim else jnp.exp(log_decay)
    if right_keys is not None:
        for j in range(keys.shape[0]):
            read = right_keys[j] @ S
            S = (decay if j == 0 else 1.0) * S + jnp.outer(keys[j], alpha[j] * values[j] - beta[j] * read)
        return S
    S = decay * S
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
        qt, kt, vt, bt, at, gt, rt = xs
        S = token_update(S, kt, vt, bt, at, gt, semantics, rt)
        return S, scale * (qt @ S)

    S_final, o = jax.lax.scan(step, S0, (q, *path_bh))
    return o, S_final


def token_generators(path_bh: Path) -> Float[Array, "T D D"]:
    """Augmented continuous-time generators of the tokens, ``D = K + V``:
    ``[[g I - sum_j beta_j k_j k_j^T, sum_j alpha_j k_j v_j^T], [0, 0]]``."""
    keys, values = path_bh.keys, path_bh.values
    T, _, K = keys.shape
    V = values.shape[-1]
    d_omega = path_bh.log_decay[:, None, None] * jnp.eye(K, dtype=keys.dtype) - jnp.einsum(
        "tj,tjk,tjl->tkl", path_bh.beta, keys, keys
    )
    d_xi = jnp.einsum("tj,tjk,tjv->tkv", path_bh.alpha, keys, values)
    top = jnp.concatenate([d_omega, d_xi], axis=-1)
    return jnp.concatenate([top, jnp.zeros((T, V, K + V), keys.dtype)], axis=-2)


def diffrax_prefix_flows(path_bh: Path, rtol: float = 1e-12) -> DenseFlow:
    """Continuous-time reference from diffrax: the flow from time 0 to every token, ``[T, K, K]``, ``[T, K, V]``.

    Solves ``dY = dX Y``, ``Y(0) = I`` for the augmented ``Y = [[P, Q], [0, I]]``, with ``X`` the
    piecewise-linear interpolation of the cumulative token generators on the grid ``0, 1, ..., T``
    (``ControlTerm`` over a ``LinearInterpolation``; Dopri8, steps clipped to the grid). Independent of the
    flow machinery; meant for small float64 checks.
    """
    import diffrax

    gens = token_generators(path_bh)
    T, D, _ = gens.shape
    K = path_bh.keys.shape[-1]
    knots = jnp.concatenate([jnp.zeros_like(gens[:1]), jnp.cumsum(gens, axis=0)])
    ts = jnp.arange(T + 1, dtype=gens.dtype)
    eye = jnp.eye(D, dtype=gens.dtype)
    term = diffrax.ControlTerm(lambda t, Y, args: jnp.einsum("ia,bj->ijab", eye, Y), diffrax.LinearInterpolation(ts, knots))
    controller = diffrax.ClipStepSizeController(diffrax.PIDController(rtol=rtol, atol=rtol), jump_ts=ts)
    sol = diffrax.diffeqsolve(
        term, diffrax.Dopri8(), 0.0, float(T), 0.05, eye, saveat=diffrax.SaveAt(ts=ts[1:]),
        stepsize_controller=controller, max_steps=100_000,
    )
    return DenseFlow(sol.ys[:, :K, :K], sol.ys[:, :K, K:])


def diffrax_solve(path_bh: Path, q: Float[Array, "T K"], S0: Float[Array, "K V"], scale, rtol: float = 1e-12):
    """Outputs and final state of ``dS = d omega . S + d xi`` from :func:`diffrax_prefix_flows`.

    Returns (o: [T, V], S_T: [K, V]) with ``o_t = scale S_t^T q_t``.
    """
    states = apply(diffrax_prefix_flows(path_bh, rtol), S0)  # [T, K, V]
    return scale * jnp.einsum("tk,tkv->tv", q, states), states[-1]
