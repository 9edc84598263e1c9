"""Output kernel: corrected values and the outputs of every chunk, given the states entering them.

For a chunk with incoming state ``S`` (micro-step decays ``G: [n]``, token decays ``G_t: [C]``,
``n = C R``, micro-step ``m`` belongs to token ``m // R``):

    o_t = scale (e^{G_t} q_t^T S + sum_{m // R <= t} e^{G_t - G_m} (q_t . k_m) (u_m - w_m S))

one program per (head, chunk): fully parallel, whichever scan produced ``S``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flowssm.kernels.common import compiler_params, dot, reference_dot, resolve_interpret


def _output_block(q, k, G, G_tok, w, u, S, *, rank: int, scale: float, matmul, operand_dtype):
    """q: [C, K], k, w: [n, K], G: [n], G_tok: [C], u: [n, V], S: [K, V] -> o: [C, V] (float32)."""
    C, n = q.shape[0], k.shape[0]
    acc = S.dtype
    mm = lambda a, b, **kw: matmul(a, b, operand_dtype=operand_dtype, **kw)
    corrected = u.astype(acc) - mm(w, S)
    token = lax.broadcasted_iota(jnp.int32, (C, n), 0)
    step = lax.broadcasted_iota(jnp.int32, (C, n), 1)
    seen = step < rank * (token + 1)
    decay = jnp.exp(jnp.where(seen, G_tok[:, None] - G[None, :], 0.0))
    att = jnp.where(seen, mm(q, k, trans_b=True) * decay, 0.0)
    return scale * (jnp.exp(G_tok)[:, None] * mm(q, S) + mm(att, corrected))


def chunk_output_kernel(q, keys, G, w, u, S_in, *, rank: int, scale: float, out_dtype=None, num_warps: int = 4,
                        num_stages: int = 1, interpret: bool | None = None):
    """q: [BH, N, C, K], keys, w: [BH, N, n, K], G: [BH, N, n] (cumulative, per micro-step), u: [BH, N, n, V],
    S_in: [BH, N, K, V] -> o: [BH, N, C, V] in ``out_dtype`` (default: float32, float64 for float64 G)."""
    BH, N, C, K = q.shape
    n, V = u.shape[2:]
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype
    out_dtype = out_dtype or G.dtype
    G_tok = G[..., rank - 1 :: rank]

    def kernel(q_ref, k_ref, g_ref, gt_ref, w_ref, u_ref, s_ref, o_ref):
        o = _output_block(q_ref[...], k_ref[...], g_ref[...], gt_ref[...], w_ref[...], u_ref[...],
                          s_ref[...].astype(g_ref.dtype), rank=rank, scale=scale, matmul=dot, operand_dtype=dtype)
        o_ref[...] = o.astype(o_ref.dtype)

    rows = lambda r, d: pl.BlockSpec((None, None, r, d), lambda i, c: (i, c, 0, 0))
    vec = lambda r: pl.BlockSpec((None, None, r), lambda i, c: (i, c, 0))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((BH, N, C, V), out_dtype),
        grid=(BH, N),
        in_specs=[rows(C, K), rows(n, K), vec(n), vec(C), rows(n, K), rows(n, V), rows(K, V)],
        out_specs=rows(C, V),
        interpret=interpret,
        compiler_params=compiler_params(num_warps, num_stages, interpret),
        name="flowssm_chunk_output",
    )(q, keys, G, G_tok, w, u, S_in)


def chunk_output_reference(q, keys, G, w, u, S_in, *, rank: int, scale: float, out_dtype=None, num_warps: int = 4,
                           num_stages: int = 1, interpret: bool | None = None):
    """Same contract as :func:`chunk_output_kernel`, in plain jnp at full precision."""
    del num_warps, num_stages, interpret
    block = lambda *a: _output_block(*a, rank=rank, scale=scale, matmul=reference_dot, operand_dtype=keys.dtype)
    o = jax.vmap(jax.vmap(block))(q, keys, G, G[..., rank - 1 :: rank], w, u, S_in.astype(G.dtype))
    return o.astype(out_dtype or G.dtype)
