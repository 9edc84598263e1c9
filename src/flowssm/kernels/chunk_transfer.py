"""Intra-chunk kernel: Gram matrix, transfer ``T ~ (I + L)^{-1}`` and the generators ``w, u``.

For one chunk of ``n = C R`` micro-steps (keys ``k``, values ``v``, steps ``b, a``, cumulative decays
``G``):

    L_im = b_i (k_i . k_m) exp(G_i - G_m)  (m < i),    w = T (b e^G k),    u = T (a v)

with ``T`` from the solver: ``exact`` (any ``method``) uses the doubling product ``prod_{i<ceil(log2 n)} (I + (-L)^(2^i))``
(exact since ``L`` is nilpotent; matmuls only), ``signature(depth)`` the truncated Neumann series
(doubling when ``depth + 1`` is a power of two, Horner otherwise), ``euler`` ``T = I``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flowssm import chunks
from flowssm.kernels.common import compiler_params, dot, resolve_interpret
from flowssm.paths import Path
from flowssm.solvers import Euler, Exact, FlowSolver, Signature


def transfer_plan(solver: FlowSolver, n: int) -> tuple[str, int]:
    """How the kernel applies ``T``: ``("doubling", factors)`` or ``("horner", depth)`` (depth 0: ``T = I``)."""
    if isinstance(solver, Exact):
        return ("doubling", math.ceil(math.log2(n))) if n > 1 else ("horner", 0)
    if isinstance(solver, Euler):
        return ("horner", 0)
    if isinstance(solver, Signature):
        terms = solver.depth + 1
        if terms > 1 and terms & (terms - 1) == 0:
            return ("doubling", int(math.log2(terms)))
        return ("horner", solver.depth)
    raise NotImplementedError(
        f"solver: backend='pallas' supports the exact, euler and signature solvers, got {solver!r}; use backend='xla'"
    )


def micro_log_decay(log_decay, rank: int):
    """Per-token log-decays ``[..., C]`` -> cumulative decay of each micro-step ``[..., C R]``."""
    dtype = jnp.promote_types(log_decay.dtype, jnp.float32)
    return jnp.repeat(jnp.cumsum(log_decay.astype(dtype), axis=-1), rank, axis=-1)


def _transfer_block(k, v, beta, alpha, G, *, plan, operand_dtype, mode):
    """One chunk. k: [n, K], v: [n, V], beta, alpha, G: [n] -> (w: [n, K], u: [n, V]) float32."""
    n = k.shape[0]
    f32 = jnp.promote_types(operand_dtype, jnp.float32)
    below = lax.broadcasted_iota(jnp.int32, (n, n), 0) > lax.broadcasted_iota(jnp.int32, (n, n), 1)
    gram = dot(k, k, operand_dtype=operand_dtype, trans_b=True)
    decay = jnp.exp(jnp.where(below, G[:, None] - G[None, :], 0.0))
    L = jnp.where(below, beta[:, None] * gram * decay, 0.0).astype(f32)
    w = (beta * jnp.exp(G))[:, None] * k.astype(f32)
    u = alpha[:, None] * v.astype(f32)
    kind, count = plan
    mm = lambda a, b: dot(a, b, operand_dtype=operand_dtype, mode=mode)
    if kind == "doubling":
        diagonal = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
        power = -L
        T = jnp.where(diagonal, 1.0, 0.0).astype(f32) + power
        for _ in range(count - 1):
            power = mm(power, power)
            T = T + mm(T, power)
        return dot(T, w, operand_dtype=operand_dtype), dot(T, u, operand_dtype=operand_dtype)
    rk, rv = w, u
    for _ in range(count):
        w = rk - mm(L, w)
        u = rv - mm(L, u)
    return w, u


def chunk_transfer_kernel(keys, values, beta, alpha, log_decay, *, solver: FlowSolver, mode: str = "operand",
                          num_warps: int = 4, num_stages: int = 1, interpret: bool | None = None):
    """Generators of every chunk, one program per (head, chunk).

    keys: [BH, N, C, R, K], values: [BH, N, C, R, V], beta, alpha: [BH, N, C, R], log_decay: [BH, N, C]
    (per token) -> (w: [BH, N, C R, K], u: [BH, N, C R, V]) in the dtype of ``keys`` (the operand dtype).
    ``mode``: matmul mode of the ``T`` powers (see ``common.DOT_MODES``).
    """
    BH, N, C, R, K = keys.shape
    V = values.shape[-1]
    n = C * R
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype
    plan = transfer_plan(solver, n)
    flat = lambda x: x.reshape(BH, N, n, *x.shape[4:])
    G = micro_log_decay(log_decay, R)

    def kernel(k_ref, v_ref, b_ref, a_ref, g_ref, w_ref, u_ref):
        f32 = g_ref.dtype
        w, u = _transfer_block(k_ref[...], v_ref[...], b_ref[...].astype(f32), a_ref[...].astype(f32), g_ref[...],
                               plan=plan, operand_dtype=dtype, mode=mode)
        w_ref[...] = w.astype(w_ref.dtype)
        u_ref[...] = u.astype(u_ref.dtype)

    rows = lambda d: pl.BlockSpec((None, None, n, d), lambda i, c: (i, c, 0, 0))
    vec = pl.BlockSpec((None, None, n), lambda i, c: (i, c, 0))
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((BH, N, n, K), dtype), jax.ShapeDtypeStruct((BH, N, n, V), dtype)),
        grid=(BH, N),
        in_specs=[rows(K), rows(V), vec, vec, vec],
        out_specs=(rows(K), rows(V)),
        interpret=interpret,
        compiler_params=compiler_params(num_warps, num_stages, interpret),
        name="flowssm_chunk_transfer",
    )(flat(keys), flat(values), flat(beta), flat(alpha), G)


def chunk_transfer_reference(keys, values, beta, alpha, log_decay, *, solver: FlowSolver, mode: str = "operand",
                             num_warps: int = 4, num_stages: int = 1, interpret: bool | None = None):
    """Same contract as :func:`chunk_transfer_kernel`, through ``chunks.build_system`` and ``solver.solve``."""
    del mode, num_warps, num_stages, interpret
    f32 = jnp.promote_types(keys.dtype, jnp.float32)
    path = Path(keys.astype(f32), values.astype(f32), beta.astype(f32), alpha.astype(f32), log_decay.astype(f32))
    sol = jax.vmap(jax.vmap(lambda c: solver.solve(chunks.build_system(c, "discrete"))))(path)
    return sol.w.astype(keys.dtype), sol.u.astype(keys.dtype)
