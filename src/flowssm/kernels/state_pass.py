"""Inter-chunk kernel: the sequential state pass over chunk flows in WY form.

For each chunk ``c`` (cumulative micro-step decays ``G``, ``G_end = G[-1]``):

    S_in[c] = S,    S <- exp(G_end) S + (exp(G_end - G) k)^T (u - w S)

one program per (head, block of ``V`` columns), looping over the ``N`` chunks with ``S`` in float32.

Backward (:func:`state_pass_bwd_kernel`): the reverse loop of the state cotangent through the state
pass and the chunk outputs (``o = scale (e^{G_t} q S + A (u - w S))``, see ``chunk_output``). With
``dS`` the cotangent of the state leaving chunk ``c`` and ``k~ = e^{G_end - G} k``:

    dv' = scale A^T do + k~ dS,    dS <- e^{G_end} dS + scale (e^{G_t} q)^T do - w^T dv'

``dv'`` (the cotangent of the corrected values ``u - w S``, hence of ``u``) and every chunk's ``dS``
are what the parallel backward kernels need.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flowssm.flows import WYFlow
from flowssm.kernels.chunk_output import attention_block
from flowssm.kernels.common import (dot, head_major, layout_dims, pallas_call, reference_dot, resolve_interpret,
                                    token_spec)
from flowssm.scan import chunk_states


def _segment_blocks(N: int, segments: int):
    """Chunks a segment and the index map of a ``[., N, ...]`` block of ``M`` chunks for program ``(i, j)``
    (``i = head * segments + segment``), as ``(head, segment)`` block indices of a head-major operand."""
    if segments < 1 or N % segments:
        raise ValueError(f"segments: expected a divisor of the number of chunks {N}, got {segments}")
    return N // segments, lambda i: (i // segments, i % segments)


def state_pass_kernel(keys, G, w, u, S0, *, heads: int | None = None, write_states: bool = True, segments: int = 1,
                      flow: bool = False, block_v: int = 64, num_warps: int = 4, num_stages: int = 2,
                      interpret: bool | None = None):
    """keys, w: [BH, N, n, K] (keys token-major [B, N, n, H, K] with ``heads=H``); G: [BH, N, n]; u: [BH, N, n, V];
    S0: [BH * segments, K, V] (float32/64) -> (S_in: [BH, N, K, V] in the dtype of ``keys``, S_final:
    [BH * segments, K, V] in the dtype of ``S0``); with ``write_states=False`` only S_final.

    ``segments``: the ``N`` chunks split into that many stretches of ``M = N / segments``, each run from its
    own ``S0[head * segments + segment]`` by its own programs (the passes of the segmented scan).
    ``flow=True`` (with ``write_states=False``, ``S0=None``): each segment's flow ``[P | Q]``,
    ``S_final: [BH * segments, K, K + V]``, the pass of ``[P | Q]`` from ``[I | 0]`` where the ``P`` columns
    see no values; the ``P`` and ``Q`` column blocks run as separate programs.
    """
    BH, N, n, K = layout_dims(keys, heads)
    V = u.shape[-1]
    if flow and (write_states or S0 is not None):
        raise ValueError("state_pass_kernel: flow=True computes segment flows from [I | 0]: pass S0=None and "
                         "write_states=False")
    M, seg = _segment_blocks(N, segments)
    bv = min(block_v, K, V) if flow else min(block_v, V)
    p_blocks = K // bv if flow else 0  # column blocks of P (flow mode) before those of the state / Q
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype
    acc = jnp.promote_types(dtype, jnp.promote_types(jnp.float32 if flow else S0.dtype, G.dtype))

    def kernel(k_ref, g_ref, w_ref, u_ref, *refs):
        s0_ref, refs = (None, refs) if flow else (refs[0], refs[1:])
        *s_in_ref, s_out_ref = refs
        j = pl.program_id(1)
        if flow:  # P columns start at the identity and see no values; Q columns start at 0
            rows, cols = lax.broadcasted_iota(jnp.int32, (K, bv), 0), lax.broadcasted_iota(jnp.int32, (K, bv), 1)
            start = ((rows == cols + j * bv) & (j < p_blocks)).astype(acc)
            values = jnp.clip(j - p_blocks + 1, 0, 1).astype(acc)  # 0 for P columns (Triton: no scalar select)
        else:
            start, values = s0_ref[...].astype(acc), 1.0

        def step(c, S):
            if write_states:
                s_in_ref[0][c] = S.astype(dtype)
            G = g_ref[c]
            G_end = g_ref[c, n - 1]
            corrected = values * u_ref[c].astype(S.dtype) - dot(w_ref[c], S, operand_dtype=dtype)
            corrected = jnp.exp(G_end - G).astype(S.dtype)[:, None] * corrected  # k~^T r = k^T (e^{G_end - G} r)
            return jnp.exp(G_end).astype(S.dtype) * S + dot(k_ref[c], corrected, operand_dtype=dtype, trans_a=True)

        s_out_ref[...] = lax.fori_loop(0, M, step, start).astype(s_out_ref.dtype)

    whole = lambda d: pl.BlockSpec((None, M, n, d), lambda i, j: (*seg(i), 0, 0))
    u_col = (lambda j: jnp.maximum(j - p_blocks, 0)) if flow else (lambda j: j)
    state = pl.BlockSpec((None, K, bv), lambda i, j: (i, 0, j))
    states = pl.BlockSpec((None, M, K, bv), lambda i, j: (*seg(i), 0, j))
    out_dtype = acc if flow else S0.dtype
    S_final = jax.ShapeDtypeStruct((BH * segments, K, K + V if flow else V), out_dtype)
    in_specs = [token_spec(whole(K), heads), pl.BlockSpec((None, M, n), lambda i, j: (*seg(i), 0)), whole(K),
                pl.BlockSpec((None, M, n, bv), lambda i, j: (*seg(i), 0, u_col(j)))]
    out = pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((BH, N, K, V), dtype), S_final) if write_states else (S_final,),
        grid=(BH * segments, (K + V if flow else V) // bv),
        in_specs=in_specs if flow else in_specs + [state],
        out_specs=(states, state) if write_states else (state,),
        interpret=interpret,
        num_warps=num_warps, num_stages=num_stages,
        name="flowssm_segment_flows" if flow else "flowssm_state_pass",
    )(keys, G, w, u, *(() if flow else (S0,)))
    return out if write_states else out[0]


def chunk_flows(keys, G, w, u) -> WYFlow:
    """The chunks' flows ``P = e^{G_end} I - (e^{G_end - G} k)^T w``, ``Q = (e^{G_end - G} k)^T u`` (float32)."""
    f32 = G.dtype
    G_end = G[..., -1]
    k_end = jnp.exp(G_end[..., None] - G)[..., None] * keys.astype(f32)
    return WYFlow(G_end, k_end, w.astype(f32), u.astype(f32))


def _by_segment(x, segments: int):
    """Head-major [BH, N, ...] -> [BH * segments, N / segments, ...] (program order of the kernels)."""
    return x.reshape(x.shape[0] * segments, x.shape[1] // segments, *x.shape[2:])


def state_pass_reference(keys, G, w, u, S0, *, heads: int | None = None, write_states: bool = True, segments: int = 1,
                         flow: bool = False, block_v: int = 64, num_warps: int = 4, num_stages: int = 2,
                         interpret: bool | None = None):
    """Same contract as :func:`state_pass_kernel`, through ``flowssm.scan.chunk_states`` (sequential)."""
    del block_v, num_warps, num_stages, interpret
    keys = head_major(keys, heads)
    BH, N, n, K = keys.shape
    V = u.shape[-1]
    _segment_blocks(N, segments)
    if flow:  # the pass of [P | Q] from [I | 0], the P columns without values
        u = jnp.concatenate([jnp.zeros((*u.shape[:-1], K), u.dtype), u], axis=-1)
        S0 = jnp.broadcast_to(jnp.eye(K, K + V, dtype=jnp.promote_types(jnp.float32, G.dtype)), (BH * segments, K, K + V))
    flows = chunk_flows(*(_by_segment(x, segments) for x in (keys, G, w, u)))
    S_in, S_final = jax.vmap(lambda f, s: chunk_states(f, s, "sequential"))(flows, S0)
    S_final = S_final.astype(S0.dtype)
    return (S_in.reshape(BH, N, K, -1).astype(keys.dtype), S_final) if write_states else S_final


def _reverse_step(q, k, w, G, G_tok, G_end, do, dS, *, rank: int, scale: float, matmul, operand_dtype):
    """One chunk of the reverse pass. q: [C, K], k, w: [n, K], G: [n], G_tok: [C], do: [C, v], dS: [K, v]
    -> (dv': [n, v], dS entering the chunk: [K, v])."""
    acc = dS.dtype
    mm = lambda a, b, **kw: matmul(a, b, operand_dtype=operand_dtype, **kw)
    att = attention_block(q, k, G, G_tok, rank=rank, matmul=matmul, operand_dtype=operand_dtype)
    # decays scale the small [rows, v] tiles, not the [rows, K] operands: fewer live float32 tiles
    dv = scale * mm(att, do, trans_a=True) + jnp.exp(G_end - G).astype(acc)[:, None] * mm(k, dS)
    do_decay = (scale * jnp.exp(G_tok)).astype(acc)[:, None] * do.astype(acc)
    return dv, jnp.exp(G_end).astype(acc) * dS + mm(q, do_decay, trans_a=True) - mm(w, dv, trans_a=True)


def state_pass_bwd_kernel(q, keys, G, w, do, dS_final, *, rank: int, scale: float, heads: int | None = None,
                          segments: int = 1, write_states: bool = True, block_v: int = 64, num_warps: int = 4,
                          num_stages: int = 2, interpret: bool | None = None):
    """Reverse pass over chunks, one program per (head, segment, block of ``V`` columns).

    q: [BH, N, C, K], keys, w: [BH, N, n, K], G: [BH, N, n] (cumulative), do: [BH, N, C, V] (cotangent of
    the outputs; q, keys and do token-major with ``heads=H``), dS_final: [BH * segments, K, V] (the cotangent
    of the state leaving each segment) -> (dS_out: [BH, N, K, V] (cotangent of the state leaving each chunk)
    and dv': [BH, N, n, V], both in the dtype of ``keys``; dS0: [BH * segments, K, V], the cotangent of the
    state entering each segment, in the dtype of ``dS_final``); with ``write_states=False`` only dS0.
    ``segments`` as in :func:`state_pass_kernel`.
    """
    BH, N, C, K = layout_dims(q, heads)
    n = keys.shape[2]
    V = do.shape[-1]
    M, seg = _segment_blocks(N, segments)
    bv = min(block_v, V)
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype
    G_tok = G[..., rank - 1 :: rank]

    def kernel(q_ref, k_ref, g_ref, gt_ref, w_ref, do_ref, dsf_ref, *outs):
        *written, ds0_ref = outs
        acc = jnp.promote_types(dtype, jnp.promote_types(dsf_ref.dtype, g_ref.dtype))

        def step(i, dS):
            c = M - 1 - i
            if write_states:
                written[0][c] = dS.astype(written[0].dtype)
            dv, dS = _reverse_step(q_ref[c], k_ref[c], w_ref[c], g_ref[c], gt_ref[c], g_ref[c, n - 1], do_ref[c], dS,
                                   rank=rank, scale=scale, matmul=dot, operand_dtype=dtype)
            if write_states:
                written[1][c] = dv.astype(written[1].dtype)
            return dS

        ds0_ref[...] = lax.fori_loop(0, M, step, dsf_ref[...].astype(acc)).astype(ds0_ref.dtype)

    whole = lambda r, d: pl.BlockSpec((None, M, r, d), lambda i, j: (*seg(i), 0, 0))
    cols = lambda r: pl.BlockSpec((None, M, r, bv), lambda i, j: (*seg(i), 0, j))
    vec = lambda r: pl.BlockSpec((None, M, r), lambda i, j: (*seg(i), 0))
    state = pl.BlockSpec((None, K, bv), lambda i, j: (i, 0, j))
    dS0 = jax.ShapeDtypeStruct((BH * segments, K, V), dS_final.dtype)
    written = (jax.ShapeDtypeStruct((BH, N, K, V), dtype), jax.ShapeDtypeStruct((BH, N, n, V), dtype))
    out = pallas_call(
        kernel,
        out_shape=(*written, dS0) if write_states else (dS0,),
        grid=(BH * segments, V // bv),
        in_specs=[token_spec(whole(C, K), heads), token_spec(whole(n, K), heads), vec(n), vec(C), whole(n, K),
                  token_spec(cols(C), heads), state],
        out_specs=(cols(K), cols(n), state) if write_states else (state,),
        interpret=interpret,
        num_warps=num_warps, num_stages=num_stages,
        name="flowssm_state_pass_bwd",
    )(q, keys, G, G_tok, w, do, dS_final)
    return out if write_states else out[0]


def state_pass_bwd_reference(q, keys, G, w, do, dS_final, *, rank: int, scale: float, heads: int | None = None,
                             segments: int = 1, write_states: bool = True, block_v: int = 64, num_warps: int = 4,
                             num_stages: int = 2, interpret: bool | None = None):
    """Same contract as :func:`state_pass_bwd_kernel`: a ``lax.scan`` in reverse at full precision."""
    del block_v, num_warps, num_stages, interpret
    q, keys, do = (head_major(x, heads) for x in (q, keys, do))
    BH, N = G.shape[:2]
    _segment_blocks(N, segments)
    acc = dS_final.dtype

    def one_head(q, k, G, w, do, dS):
        def step(dS, x):
            q, k, G, w, do = x
            dv, dS_prev = _reverse_step(q, k, w, G, G[rank - 1 :: rank], G[-1], do, dS, rank=rank, scale=scale,
                                        matmul=reference_dot, operand_dtype=keys.dtype)
            return dS_prev, (dS, dv)

        dS0, (dS_out, dv) = lax.scan(step, dS.astype(acc), (q, k, G, w, do), reverse=True)
        return dS_out, dv, dS0

    dS_out, dv, dS0 = jax.vmap(one_head)(*(_by_segment(x, segments) for x in (q, keys, G, w, do)), dS_final)
    if not write_states:
        return dS0
    unsplit = lambda x: x.reshape(BH, N, *x.shape[2:]).astype(keys.dtype)
    return unsplit(dS_out), unsplit(dv), dS0
