"""Inter-chunk kernel: the sequential state pass over chunk flows in WY form.

For each chunk ``c`` (cumulative micro-step decays ``G``, ``G_end = G[-1]``):

    S_in[c] = S,    S <- exp(G_end) S + (exp(G_end - G) k)^T (u - w S)

one program per (head, block of ``V`` columns), looping over the ``N`` chunks with ``S`` in float32.

Backward (:func:`state_pass_bwd_kernel`, reverse loop over chunks; ``dS`` the cotangent of the
state leaving chunk ``c``, ``S = S_in[c]``, ``k~ = exp(G_end - G) k``, ``r = u - w S``):

    du = k~ dS,   dw = -du S^T,   dk~ = r dS^T,   dS_in-total = e^{G_end} dS - w^T du + dS_in[c]
    dG = -rowsum(dk~ * k~) + [last] (e^{G_end} <S, dS> + sum(dk~ * k~)),   dk = exp(G_end - G) dk~
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flowssm.flows import WYFlow
from flowssm.kernels.common import compiler_params, dot, resolve_interpret
from flowssm.scan import chunk_states


def state_pass_kernel(keys, G, w, u, S0, *, block_v: int = 64, num_warps: int = 4, num_stages: int = 2,
                      interpret: bool | None = None):
    """keys, w: [BH, N, n, K]; G: [BH, N, n]; u: [BH, N, n, V]; S0: [BH, K, V] (float32/64)
    -> (S_in: [BH, N, K, V] in the dtype of ``keys``, S_final: [BH, K, V] in the dtype of ``S0``)."""
    BH, N, n, K = keys.shape
    V = u.shape[-1]
    bv = min(block_v, V)
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype

    def kernel(k_ref, g_ref, w_ref, u_ref, s0_ref, s_in_ref, s_out_ref):
        def step(c, S):
            s_in_ref[c] = S.astype(s_in_ref.dtype)
            G = g_ref[c]
            G_end = g_ref[c, n - 1]
            corrected = u_ref[c].astype(S.dtype) - dot(w_ref[c], S, operand_dtype=dtype)
            k_end = jnp.exp(G_end - G).astype(S.dtype)[:, None] * k_ref[c].astype(S.dtype)
            return jnp.exp(G_end).astype(S.dtype) * S + dot(k_end, corrected, operand_dtype=dtype, trans_a=True)

        acc = jnp.promote_types(dtype, jnp.promote_types(S0.dtype, g_ref.dtype))
        s_out_ref[...] = lax.fori_loop(0, N, step, s0_ref[...].astype(acc)).astype(s_out_ref.dtype)

    whole = lambda d: pl.BlockSpec((None, N, n, d), lambda i, j: (i, 0, 0, 0))
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((BH, N, K, V), dtype), jax.ShapeDtypeStruct((BH, K, V), S0.dtype)),
        grid=(BH, V // bv),
        in_specs=[
            whole(K),
            pl.BlockSpec((None, N, n), lambda i, j: (i, 0, 0)),
            whole(K),
            pl.BlockSpec((None, N, n, bv), lambda i, j: (i, 0, 0, j)),
            pl.BlockSpec((None, K, bv), lambda i, j: (i, 0, j)),
        ],
        out_specs=(
            pl.BlockSpec((None, N, K, bv), lambda i, j: (i, 0, 0, j)),
            pl.BlockSpec((None, K, bv), lambda i, j: (i, 0, j)),
        ),
        interpret=interpret,
        compiler_params=compiler_params(num_warps, num_stages, interpret),
        name="flowssm_state_pass",
    )(keys, G, w, u, S0)


def chunk_flows(keys, G, w, u) -> WYFlow:
    """The chunks' flows ``P = e^{G_end} I - (e^{G_end - G} k)^T w``, ``Q = (e^{G_end - G} k)^T u`` (float32)."""
    f32 = G.dtype
    G_end = G[..., -1]
    k_end = jnp.exp(G_end[..., None] - G)[..., None] * keys.astype(f32)
    return WYFlow(G_end, k_end, w.astype(f32), u.astype(f32))


def state_pass_reference(keys, G, w, u, S0, *, block_v: int = 64, num_warps: int = 4, num_stages: int = 2,
                         interpret: bool | None = None):
    """Same contract as :func:`state_pass_kernel`, through ``flowssm.scan.chunk_states`` (sequential)."""
    del block_v, num_warps, num_stages, interpret
    S_in, S_final = jax.vmap(lambda f, s: chunk_states(f, s, "sequential"))(chunk_flows(keys, G, w, u), S0)
    return S_in.astype(keys.dtype), S_final.astype(S0.dtype)


def state_pass_bwd_kernel(keys, G, w, u, S_in, dS_in, dS_final, *, block_v: int = 64, num_warps: int = 4,
                          num_stages: int = 2, interpret: bool | None = None):
    """Cotangents of :func:`state_pass_kernel`'s inputs from its saved ``S_in`` and the output cotangents.

    keys, w: [BH, N, n, K]; G: [BH, N, n]; u: [BH, N, n, V]; S_in, dS_in: [BH, N, K, V]; dS_final: [BH, K, V]
    -> (dkeys, dG, dw, du, dS0) in float32 (float64 for float64 inputs), shaped like the inputs.
    Contractions over ``V`` are summed over the ``V`` blocks outside the kernel.
    """
    BH, N, n, K = keys.shape
    V = u.shape[-1]
    bv = min(block_v, V)
    nvb = V // bv
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype
    acc = jnp.promote_types(dtype, jnp.promote_types(dS_final.dtype, G.dtype))

    def kernel(k_ref, g_ref, w_ref, u_ref, s_ref, ds_in_ref, dsf_ref, dk_ref, dg_ref, dw_ref, du_ref, ds0_ref):
        last = lax.broadcasted_iota(jnp.int32, (n,), 0) == n - 1

        def step(i, dS):
            c = N - 1 - i
            G = g_ref[c]
            G_end = g_ref[c, n - 1]
            S = s_ref[c].astype(acc)
            decay = jnp.exp(G_end - G).astype(acc)
            k_end = decay[:, None] * k_ref[c].astype(acc)
            w = w_ref[c]
            du = dot(k_end, dS, operand_dtype=dtype)
            corrected = u_ref[c].astype(acc) - dot(w, S, operand_dtype=dtype)
            dk_end = dot(corrected, dS, operand_dtype=dtype, trans_b=True)
            dw_ref[c] = -dot(du, S, operand_dtype=dtype, trans_b=True)
            du_ref[c] = du.astype(du_ref.dtype)
            dk_ref[c] = (decay[:, None] * dk_end).astype(dk_ref.dtype)
            through = jnp.sum(dk_end * k_end, axis=1)
            d_end = jnp.exp(G_end).astype(acc) * jnp.sum(S * dS) + jnp.sum(through)
            dg_ref[c] = (jnp.where(last, d_end, 0.0) - through).astype(dg_ref.dtype)
            return (jnp.exp(G_end).astype(acc) * dS - dot(w, du, operand_dtype=dtype, trans_a=True)
                    + ds_in_ref[c].astype(acc))

        ds0_ref[...] = lax.fori_loop(0, N, step, dsf_ref[...].astype(acc)).astype(ds0_ref.dtype)

    whole = lambda d: pl.BlockSpec((None, N, n, d), lambda i, j: (i, 0, 0, 0))
    cols = lambda r: pl.BlockSpec((None, N, r, bv), lambda i, j: (i, 0, 0, j))
    partial = lambda *tail: pl.BlockSpec((None, None, N, *tail), lambda i, j: (j, i, 0) + (0,) * len(tail))
    state = pl.BlockSpec((None, K, bv), lambda i, j: (i, 0, j))
    dk, dG, dw, du, dS0 = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((nvb, BH, N, n, K), acc), jax.ShapeDtypeStruct((nvb, BH, N, n), acc),
                   jax.ShapeDtypeStruct((nvb, BH, N, n, K), acc), jax.ShapeDtypeStruct((BH, N, n, V), acc),
                   jax.ShapeDtypeStruct((BH, K, V), acc)),
        grid=(BH, nvb),
        in_specs=[whole(K), pl.BlockSpec((None, N, n), lambda i, j: (i, 0, 0)), whole(K), cols(n), cols(K), cols(K), state],
        out_specs=(partial(n, K), partial(n), partial(n, K), cols(n), state),
        interpret=interpret,
        compiler_params=compiler_params(num_warps, num_stages, interpret),
        name="flowssm_state_pass_bwd",
    )(keys, G, w, u, S_in, dS_in, dS_final)
    return dk.sum(0), dG.sum(0), dw.sum(0), du, dS0


def _state_pass_fwd(static, keys, G, w, u, S0):
    S_in, S_final = state_pass_kernel(keys, G, w, u, S0, **dict(static))
    return (S_in, S_final), (keys, G, w, u, S0, S_in)


def _state_pass_bwd(static, residuals, cotangents):
    keys, G, w, u, S0, S_in = residuals
    dS_in, dS_final = cotangents
    grads = state_pass_bwd_kernel(keys, G, w, u, S_in, dS_in, dS_final, **dict(static))
    return tuple(d.astype(x.dtype) for d, x in zip(grads, (keys, G, w, u, S0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _state_pass(static, keys, G, w, u, S0):
    return state_pass_kernel(keys, G, w, u, S0, **dict(static))


_state_pass.defvjp(_state_pass_fwd, _state_pass_bwd)


def state_pass(keys, G, w, u, S0, **static):
    """:func:`state_pass_kernel` with the backward kernel :func:`state_pass_bwd_kernel` (same arguments)."""
    return _state_pass(tuple(sorted(static.items())), keys, G, w, u, S0)
