"""Affine flows ``S -> P S + Q`` of the state over an interval, and their composition law.

Two representations of the same map:

* :class:`WYFlow` keeps ``P`` structured: ``P = diag(exp(d)) - keys^T w``, ``Q = keys^T u`` with
  ``keys, w: [..., n, K]``, ``u: [..., n, V]`` (``n`` = micro-steps folded in) and the log-decay ``d``
  a scalar ``[...]`` or per key channel ``[..., K]``. It is what a solver produces for a chunk;
  composing two WY flows stays WY (the rank adds up).
* :class:`DenseFlow` holds ``P: [..., K, K]`` and ``Q: [..., K, V]``; the associative scan uses it.

Composition (apply ``first`` then ``second``): ``(P2, Q2) o (P1, Q1) = (P2 P1, P2 Q1 + Q2)``.
All functions accept arbitrary leading batch dimensions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float


class WYFlow(NamedTuple):
    """``P = diag(exp(log_decay)) - keys^T w``, ``Q = keys^T u``; log_decay: [...] or [..., K]."""

    log_decay: Float[Array, "..."] | Float[Array, "... K"]
    keys: Float[Array, "... n K"]
    w: Float[Array, "... n K"]
    u: Float[Array, "... n V"]


class DenseFlow(NamedTuple):
    """``S -> P S + Q`` with dense ``P: [..., K, K]``, ``Q: [..., K, V]``."""

    P: Float[Array, "... K K"]
    Q: Float[Array, "... K V"]


def identity(batch_shape: tuple, K: int, V: int, dtype) -> DenseFlow:
    eye = jnp.broadcast_to(jnp.eye(K, dtype=dtype), (*batch_shape, K, K))
    return DenseFlow(eye, jnp.zeros((*batch_shape, K, V), dtype))


def row_decay(flow: WYFlow) -> Float[Array, "... Kd 1"]:
    """``exp(d)`` shaped to scale the rows of a ``[..., K, X]`` matrix: ``[..., 1, 1]`` or ``[..., K, 1]``."""
    d = jnp.exp(flow.log_decay)
    return d[..., :, None] if flow.log_decay.ndim == flow.keys.ndim - 1 else d[..., None, None]


def densify(flow: WYFlow | DenseFlow) -> DenseFlow:
    if isinstance(flow, DenseFlow):
        return flow
    K = flow.keys.shape[-1]
    eye = jnp.eye(K, dtype=flow.keys.dtype)
    P = row_decay(flow) * eye - jnp.einsum("...nk,...nj->...kj", flow.keys, flow.w)
    Q = jnp.einsum("...nk,...nv->...kv", flow.keys, flow.u)
    return DenseFlow(P, Q)


def apply(flow: WYFlow | DenseFlow, S: Float[Array, "... K V"]) -> Float[Array, "... K V"]:
    """``P S + Q``; for a WY flow this is ``diag(exp(d)) S + keys^T (u - w S)`` (no ``K x K`` product)."""
    if isinstance(flow, DenseFlow):
        return flow.P @ S + flow.Q
    corrected = flow.u - flow.w @ S
    return row_decay(flow) * S + jnp.swapaxes(flow.keys, -1, -2) @ corrected


def compose(second: WYFlow | DenseFlow, first: WYFlow | DenseFlow):
    """The flow of ``first`` followed by ``second``: ``(P2 P1, P2 Q1 + Q2)``.

    Dense flows compose densely. WY flows compose in WY form: with ``c = w2 keys1^T`` and
    ``D = diag(exp(d))``: ``keys = [keys2; keys1]``, ``w = [exp(d1) w2 - c w1; exp(d2) w1]``,
    ``u = [u2 - c u1; exp(d2) u1]`` for scalar decays; per key channel (``D2`` does not commute past
    ``keys1^T``) ``keys = [keys2; keys1 D2]``, ``w = [w2 D1 - c w1; w1]``, ``u = [u2 - c u1; u1]``.
    """
    if isinstance(second, DenseFlow) or isinstance(first, DenseFlow):
        s = second if isinstance(second, DenseFlow) else densify(second)
        f = first if isinstance(first, DenseFlow) else densify(first)
        return DenseFlow(s.P @ f.P, s.P @ f.Q + s.Q)
    cross = second.w @ jnp.swapaxes(first.keys, -1, -2)  # [..., n2, n1]
    if first.log_decay.ndim == first.keys.ndim - 1:  # per key channel: D1, D2 scale columns of w2, keys1
        d1, d2 = jnp.exp(first.log_decay)[..., None, :], jnp.exp(second.log_decay)[..., None, :]
        return WYFlow(
            log_decay=first.log_decay + second.log_decay,
            keys=jnp.concatenate([second.keys, d2 * first.keys], axis=-2),
            w=jnp.concatenate([d1 * second.w - cross @ first.w, first.w], axis=-2),
            u=jnp.concatenate([second.u - cross @ first.u, first.u], axis=-2),
        )
    d1 = jnp.exp(first.log_decay)[..., None, None]
    d2 = jnp.exp(second.log_decay)[..., None, None]
    return WYFlow(
        log_decay=first.log_decay + second.log_decay,
        keys=jnp.concatenate([second.keys, first.keys], axis=-2),
        w=jnp.concatenate([d1 * second.w - cross @ first.w, d2 * first.w], axis=-2),
        u=jnp.concatenate([second.u - cross @ first.u, d2 * first.u], axis=-2),
    )
