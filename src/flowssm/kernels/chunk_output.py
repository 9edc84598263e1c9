"""Output kernel: corrected values and the outputs of every chunk, given the states entering them.

For a chunk with incoming state ``S`` (micro-step decays ``G: [n]``, token decays ``G_t: [C]``,
``n = C R``, micro-step ``m`` belongs to token ``m // R``):

    o_t = scale (e^{G_t} q_t^T S + sum_{m // R <= t} e^{G_t - G_m} (q_t . k_m) (u_m - w_m S))

one program per (head, chunk): fully parallel, whichever scan produced ``S``.

Backward (:func:`chunk_output_bwd_kernel`, per chunk and block of ``K`` columns, given the
cotangent ``dS'`` of the state leaving the chunk from ``state_pass_bwd_kernel``; ``r = u - w S`` saved by
the forward's state pass, ``do~ = scale do``, ``A`` the masked decayed ``q k^T``, ``dA = do~ r^T`` on the mask):

    dq = e^{G_t} do~ S^T + (dA * D) k,   dk = (dA * D)^T q + e^{G_end - G} r dS'^T,
    dG from every ``e^{...}``: the token decays ``G_t``, the micro-step decays ``G`` and ``G_end``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flowssm import chunks
from flowssm.kernels import decay, packed
from flowssm.kernels.common import (dot, head_major, in_layout, layout_dims, pallas_call, reference_dot,
                                    resolve_interpret, to_head_major, token_major)


def _mask_and_decay(G, G_tok, rank: int):
    """[C, n] mask ``m // R <= t`` and decays ``e^{G_t - G_m}`` on it (1 off it)."""
    C, n = G_tok.shape[0], G.shape[0]
    token = lax.broadcasted_iota(jnp.int32, (C, n), 0)
    step = lax.broadcasted_iota(jnp.int32, (C, n), 1)
    seen = step < rank * (token + 1)
    return seen, jnp.exp(jnp.where(seen, G_tok[:, None] - G[None, :], 0.0))


def _blocks(q) -> int:
    return chunks.score_blocks(q.shape[0])


def attention_block(q, k, G, G_tok, *, rank: int, matmul, operand_dtype, rows=None, score_mode: str = "operand",
                    channel_block: int | None = None):
    """Intra-chunk attention ``A_tm = e^{G_t - G_m} (q_t . k_m)`` for ``m // R <= t``, else 0: [C, n]; per key
    channel (``G: [n, K]``, ``G_tok: [C, K]``) ``A_tm = sum_c q_tc k_mc e^{G_tc - G_mc}`` (``decay.scores``, with
    its kernel ``rows`` loaders: then the operands give only shapes and may be the kernel's refs; its matmuls
    in ``score_mode``, over blocks of ``channel_block`` key channels, see ``launch.Tuning``)."""
    if len(G.shape) == 2:
        return decay.scores(q, G_tok, k, G, blocks=_blocks(q), rank=rank, shift=rank,
                            matmul=functools.partial(matmul, mode=score_mode), operand_dtype=operand_dtype, rows=rows,
                            channels=channel_block)
    seen, pair_decay = _mask_and_decay(G, G_tok, rank)
    return jnp.where(seen, matmul(q, k, operand_dtype=operand_dtype, trans_b=True) * pair_decay, 0.0)


def _output_block(q, k, G, G_tok, w, u, S, *, rank: int, scale: float, matmul, operand_dtype, rows=None,
                  score_mode: str = "operand", channel_block: int | None = None):
    """q: [C, K], k, w: [n, K] (``w=None``: 0), G: [n], G_tok: [C] (or [n, K], [C, K]), u: [n, V], S: [K, V]
    -> (o: [C, V], corrected ``u - w S``: [n, V], the attention block ``A``: [C, n]) in float32 (float64 for
    float64 ``G``).
    Operands: arrays, or the kernel's refs, each read (``x[...]``) where first needed; ``rows`` as in
    :func:`attention_block`, as ``score_mode`` and ``channel_block``."""
    mm = lambda a, b, **kw: matmul(a, b, operand_dtype=operand_dtype, **kw)
    acc = G.dtype
    if len(G.shape) == 2:  # per key channel: the scores first (from ``rows``), then the state's tiles
        att = attention_block(q, k, G, G_tok, rank=rank, matmul=matmul, operand_dtype=operand_dtype, rows=rows,
                              score_mode=score_mode, channel_block=channel_block)
        S = S[...].astype(acc)
        corrected = u[...].astype(acc) if w is None else u[...].astype(acc) - mm(w[...], S)
        return scale * (mm(jnp.exp(G_tok[...]) * q[...].astype(acc), S) + mm(att, corrected)), corrected, att
    q, k, G, G_tok, u = (x[...] for x in (q, k, G, G_tok, u))
    S = S[...].astype(acc)
    corrected = u.astype(acc) if w is None else u.astype(acc) - mm(w[...], S)
    att = attention_block(q, k, G, G_tok, rank=rank, matmul=matmul, operand_dtype=operand_dtype)
    return scale * (jnp.exp(G_tok)[:, None] * mm(q, S) + mm(att, corrected)), corrected, att


def chunk_output_kernel(q, keys, G, w, u, S_in, *, rank: int, scale: float, out_dtype=None,
                        save_corrected: bool = False, save_scores: bool = False, heads: int | None = None,
                        block_v: int | None = None, score_mode: str = "operand", channel_block: int | None = None,
                        num_warps: int = 4, num_stages: int = 1, interpret: bool | None = None,
                        packed_rows: packed.ChunkTable | None = None):
    """q: [BH, N, C, K], keys, w: [BH, N, n, K], G: [BH, N, n] (cumulative, per micro-step), u: [BH, N, n, V],
    S_in: [BH, N, K, V] -> o: [BH, N, C, V] in ``out_dtype`` (default: float32, float64 for float64 G);
    with ``save_corrected`` -> (o, corrected ``u - w S_in``: [BH, N, n, V] in the dtype of ``keys``), and with
    ``save_scores`` also (last) the attention blocks ``A: [BH, N, C, n]`` in the dtype of ``keys``, the operand dtype
    of the reverse pass's product with them (per-channel decays: the reverse state pass reads them instead of
    recomputing ``decay.scores`` inside its serial loop). ``w=None``: ``w = 0`` (additive paths: the corrected
    values are ``u``, never saved), never read; ``u`` may be token-major ``[B, N, n, H, V]`` (by its rank).
    With ``heads=H``, q, keys and o are token-major ([B, N, ·, H, ·], see ``common``). One program per
    (head, chunk, block of ``block_v`` columns of ``V``; None: all of them): the ``[C, n]`` attention
    block is recomputed per column block, the state tile is ``[K, block_v]``. ``score_mode``: the matmul mode
    of per-channel decayed scores (``launch.Tuning.score_mode``), formed over blocks of ``channel_block`` key
    channels (``launch.Tuning.channel_block``). ``packed_rows`` (packed sequences read in place, :mod:`.packed`): q, keys
    and o are the packed rows ``[1, T, H, K]``, ``[1, T R, H, K]``, ``[1, T, H, V]`` and ``N`` the table's chunks."""
    if packed_rows is None:
        BH, N, C, K = layout_dims(q, heads)
    else:
        BH, N, C, K = heads, packed_rows.chunks, G.shape[2] // rank, q.shape[-1]
    n, V = G.shape[2], u.shape[-1]
    bv = min(block_v or V, V)
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype
    out_dtype = out_dtype or G.dtype
    G_tok = decay.token_decays(G, rank)

    if save_corrected and w is None:
        raise ValueError("chunk_output_kernel: save_corrected=True with w=None: the corrected values are u itself")

    own_tokens = rank > 1  # for one micro-step a token the token decays are G itself: its block, read once

    def kernel(*refs):
        if packed_rows is not None:  # the chunk's rows of the packed operands
            c = pl.program_id(1)
            table_ref, q_ref, k_ref, *refs = refs
            q_ref, k_ref = packed.chunk_rows(q_ref, table_ref, c, C), packed.chunk_rows(k_ref, table_ref, c, n, rank)
        else:
            q_ref, k_ref, *refs = refs
        g_ref, *refs = refs
        gt_ref, refs = (refs[0], refs[1:]) if own_tokens else (g_ref, refs)
        rows = (decay.ref_rows(q_ref, gt_ref), decay.ref_rows(k_ref, g_ref))
        w_ref, refs = (None, refs) if w is None else (refs[0], refs[1:])
        u_ref, s_ref, o_ref, *saved_refs = refs
        o_ref = o_ref if packed_rows is None else packed.chunk_rows(o_ref, table_ref, c, C)
        o, corrected, att = _output_block(q_ref, k_ref, g_ref, gt_ref, w_ref, u_ref, s_ref, rank=rank, scale=scale,
                                          matmul=dot, operand_dtype=dtype, score_mode=score_mode, rows=rows,
                                          channel_block=channel_block)
        o_ref[...] = o.astype(o_ref.dtype)
        if save_corrected:
            saved_refs[0][...] = corrected.astype(dtype)
        if save_scores:  # every column block writes the same block
            saved_refs[-1][...] = att.astype(saved_refs[-1].dtype)

    rows = lambda r, d: pl.BlockSpec((None, None, r, d), lambda i, c, j: (i, c, 0, 0))
    cols = lambda r: pl.BlockSpec((None, None, r, bv), lambda i, c, j: (i, c, 0, j))
    tok = lambda spec, x: packed.operand_spec(spec, heads, x, packed_rows)
    vec = lambda r: pl.BlockSpec((None, None, r), lambda i, c, j: (i, c, 0))
    out_shape = jax.ShapeDtypeStruct((BH, N, C, V) if heads is None else (BH // heads, N, C, heads, V), out_dtype)
    if packed_rows is not None:
        out_shape = jax.ShapeDtypeStruct((*q.shape[:-1], V), out_dtype)
    out_shape, out_specs = (out_shape,), (tok(cols(C), q),)
    saves = save_corrected or save_scores
    if save_corrected:
        out_shape, out_specs = (*out_shape, jax.ShapeDtypeStruct((BH, N, n, V), dtype)), (*out_specs, cols(n))
    if save_scores:
        out_shape, out_specs = (*out_shape, jax.ShapeDtypeStruct((BH, N, C, n), dtype)), (*out_specs, rows(C, n))
    return pallas_call(
        kernel,
        out_shape=out_shape if saves else out_shape[0],
        grid=(BH, N, V // bv),
        in_specs=[*packed.table_specs(packed_rows), tok(rows(C, K), q), tok(rows(n, K), keys),
                  *((rows(n, K), rows(C, K)) if decay.per_channel(G) else (vec(n), vec(C)))[:1 + own_tokens],
                  *([] if w is None else [rows(n, K)]), in_layout(cols(n), u, heads), cols(K)],
        out_specs=out_specs if saves else out_specs[0],
        interpret=interpret,
        num_warps=num_warps, num_stages=num_stages,
        name="flowssm_chunk_output",
    )(*packed.table_args(packed_rows), q, keys, G, *(G_tok,) * own_tokens, *(() if w is None else (w,)), u, S_in)


def chunk_output_reference(q, keys, G, w, u, S_in, *, rank: int, scale: float, out_dtype=None,
                           heads: int | None = None, block_v: int | None = None, num_warps: int = 4,
                           num_stages: int = 1, interpret: bool | None = None):
    """Same contract as :func:`chunk_output_kernel` (without ``save_corrected``), in plain jnp at full precision."""
    del block_v, num_warps, num_stages, interpret
    q, keys, u = head_major(q, heads), head_major(keys, heads), to_head_major(u, heads)
    w = jnp.zeros(keys.shape, keys.dtype) if w is None else w
    block = lambda *a: _output_block(*a, rank=rank, scale=scale, matmul=reference_dot, operand_dtype=keys.dtype)[0]
    o = jax.vmap(jax.vmap(block))(q, keys, G, decay.token_decays(G, rank), w, u, S_in.astype(G.dtype))
    return token_major(o.astype(out_dtype or G.dtype), heads)


def _output_bwd_block(q, k, G, G_tok, corrected, S, dS_out, do, *, rank: int, scale: float, matmul,
                      operand_dtype, rows=None, score_mode: str = "operand", decay_grads: bool = True):
    """One chunk's cotangents (see the module docstring) over a block of ``k`` columns of ``K``.

    q: [C, k], k: [n, k], G: [n], G_tok: [C], corrected (``u - w S``, saved by the forward): [n, V],
    S, dS_out: [k, V], do: [C, V] -> (dq: [C, k], dk: [n, k], dG: [n], dG_tok: [C]);
    dG and dG_tok are this block's share (every term is linear in the ``K`` columns: the shares add up);
    ``decay_grads=False`` (a path without decays, scalar ``G = 0``): both None, not formed.
    Per key channel (G: [n, k], G_tok: [C, k]): dG: [n, k] and dG_tok: [C, k], this block's columns.
    Operands: arrays, or the kernel's refs, each read (``x[...]``) where first needed; ``rows`` as in
    :func:`attention_block`.
    """
    n = k.shape[0]
    acc = G.dtype
    mm = lambda a, b, **kw: matmul(a, b, operand_dtype=operand_dtype, **kw)
    last = lax.broadcasted_iota(jnp.int32, (n, 1), 0) == n - 1
    if len(G.shape) == 2:  # the scores' vjp first (from ``rows``), then the state's tiles
        d_att = scale * mm(do[...], corrected[...], trans_b=True)
        dq_att, dk_att = decay.scores_vjp(q, G_tok, k, G, d_att, blocks=_blocks(q), rank=rank, shift=rank,
                                          matmul=functools.partial(matmul, mode=score_mode),
                                          operand_dtype=operand_dtype, rows=rows)
        S, dS_out = S[...].astype(acc), dS_out[...].astype(acc)
        dq_state = scale * jnp.exp(G_tok[...]) * mm(do[...], S, trans_b=True)
        G_end, G = G[n - 1], G[...]
        dk_state = jnp.exp(G_end[None, :] - G) * mm(corrected[...], dS_out, trans_b=True)
        k32 = k[...].astype(acc)
        through_k = dk_state * k32
        d_end = jnp.exp(G_end) * jnp.sum(S * dS_out, axis=1) + jnp.sum(through_k, axis=0)
        dG = jnp.where(last, d_end[None, :], 0.0) - k32 * dk_att - through_k
        return (dq_state + dq_att, dk_att + dk_state, dG, q[...].astype(acc) * (dq_att + dq_state))
    G_end = G[n - 1]
    q, k, G, G_tok, corrected, S, dS_out, do = (x[...] for x in (q, k, G, G_tok, corrected, S, dS_out, do))
    seen, pair_decay = _mask_and_decay(G, G_tok, rank)
    d_att = scale * mm(do, corrected, trans_b=True)  # ``scale`` on the products, ``do`` stays in its dtype
    # (in this order the decayed kernel's tiles fit its registers on sm_90: forming the decays' terms after
    # dq spilled 360-572 B a thread)
    through_att = jnp.where(seen, d_att * mm(q, k, trans_b=True) * pair_decay, 0.0) if decay_grads else None
    d_qk = jnp.where(seen, d_att * pair_decay, 0.0)
    dq_state = (scale * jnp.exp(G_tok))[:, None] * mm(do, S, trans_b=True)
    dk_state = jnp.exp(G_end - G)[:, None] * mm(corrected, dS_out, trans_b=True)
    if decay_grads:
        through_k = jnp.sum(dk_state * k.astype(acc), axis=1)
        d_end = jnp.exp(G_end) * jnp.sum(S.astype(acc) * dS_out.astype(acc)) + jnp.sum(through_k)
    dq, dk = dq_state + mm(d_qk, k), mm(d_qk, q, trans_a=True) + dk_state
    if not decay_grads:
        return dq, dk, None, None
    return (dq, dk, jnp.where(last[:, 0], d_end, 0.0) - jnp.sum(through_att, axis=0) - through_k,
            jnp.sum(through_att, axis=1) + jnp.sum(dq_state * q.astype(acc), axis=1))


def chunk_output_bwd_kernel(q, keys, G, corrected, S_in, dS_out, do, *, rank: int, scale: float,
                            heads: int | None = None, block_k: int = 64, score_mode: str = "operand",
                            num_warps: int = 4, num_stages: int = 1, interpret: bool | None = None,
                            packed_rows: packed.ChunkTable | None = None, decay_grads: bool = True):
    """Cotangents of the chunk outputs and of the state pass through ``q, keys, G``, one program per
    (head, chunk, block of ``K`` columns).

    q: [BH, N, C, K], keys: [BH, N, n, K], G: [BH, N, n] (cumulative; or [BH, N, n, K] per key channel, then
    dG too), corrected (``u - w S_in``, from the
    forward's state pass): [BH, N, n, V], S_in: [BH, N, K, V], dS_out: [BH, N, K, V] (from
    ``state_pass_bwd_kernel``), do: [BH, N, C, V] -> (dq: [BH, N, C, K] in the dtype of ``q`` (its final dtype:
    nothing else adds to it), dkeys: [BH, N, n, K] in the dtype of ``keys`` (the transfer backward adds this share
    to its own), dG: [BH, N, n] in float32 (float64 for float64 ``G``)); dG includes the token decays' share.
    ``w``'s cotangent ``dw = -dv' S_in^T`` is formed by the transfer backward (``chunk_transfer_bwd_kernel(S_in=)``),
    which reads ``dv'`` anyway.
    With ``heads=H``, q, keys, do, dq and dkeys are token-major (``corrected`` may be, by its rank: ``u`` of an
    additive path). ``score_mode``: as the forward's. ``packed_rows`` (packed sequences read in place,
    :mod:`.packed`): q, keys, do, dq and dkeys are packed rows ``[1, T r, H, ·]``. ``decay_grads=False`` (a path
    without decays: scalar ``G = 0``): dG is not formed (None), nor the products only it needs.
    """
    n, V = G.shape[2], do.shape[-1]
    BH, N, C, K = layout_dims(q, heads) if packed_rows is None else (heads, packed_rows.chunks, n // rank,
                                                                     q.shape[-1])
    bk = min(block_k, K)
    nkb = K // bk
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype
    acc = G.dtype
    G_tok = decay.token_decays(G, rank)
    per_channel = decay.per_channel(G)
    if per_channel and not decay_grads:
        raise ValueError(f"decay_grads: False is for paths without decays (scalar G), got per-channel G {G.shape}")

    def kernel(*refs):
        table_ref, refs = (None, refs) if packed_rows is None else (refs[0], refs[1:])
        q_ref, k_ref, g_ref, gt_ref, r_ref, s_ref, ds_ref, do_ref, *refs = refs
        dq_ref, dk_ref, *decay_refs = refs
        if packed_rows is not None:  # the chunk's rows of the packed operands
            c = pl.program_id(1)
            q_ref, k_ref, do_ref, dq_ref, dk_ref = (packed.chunk_rows(x, table_ref, c, size, per_token) for
                                                    x, size, per_token in ((q_ref, C, 1), (k_ref, n, rank),
                                                                           (do_ref, C, 1), (dq_ref, C, 1),
                                                                           (dk_ref, n, rank)))
        grads = _output_bwd_block(q_ref, k_ref, g_ref, gt_ref, r_ref, s_ref, ds_ref, do_ref, rank=rank,
                                  scale=scale, matmul=dot, operand_dtype=dtype, score_mode=score_mode,
                                  rows=(decay.ref_rows(q_ref, gt_ref), decay.ref_rows(k_ref, g_ref)),
                                  decay_grads=decay_grads)
        for ref, x in zip((dq_ref, dk_ref, *decay_refs), grads):
            ref[...] = x.astype(ref.dtype)

    rows = lambda r, d: pl.BlockSpec((None, None, r, d), lambda i, c, j: (i, c, 0, 0))
    cols = lambda r: pl.BlockSpec((None, None, r, bk), lambda i, c, j: (i, c, 0, j))
    state = pl.BlockSpec((None, None, bk, V), lambda i, c, j: (i, c, j, 0))
    vec = lambda r: pl.BlockSpec((None, None, r), lambda i, c, j: (i, c, 0))
    share = lambda r: pl.BlockSpec((None, None, None, r), lambda i, c, j: (j, i, c, 0))
    tok = lambda spec, x: packed.operand_spec(spec, heads, x, packed_rows)
    if per_channel:  # the decays' cotangents per key channel: each program writes its own columns
        decays, decay_shapes, decay_outs = (cols(n), cols(C)), ((BH, N, n, K), (BH, N, C, K)), (cols(n), cols(C))
    else:  # each block of K columns writes its share
        decays, decay_shapes, decay_outs = (vec(n), vec(C)), ((nkb, BH, N, n), (nkb, BH, N, C)), (share(n), share(C))
    decay_shapes, decay_outs = (decay_shapes, decay_outs) if decay_grads else ((), ())
    shapes = (q.shape, keys.shape, *decay_shapes)
    dtypes = (q.dtype, dtype, *[acc] * len(decay_shapes))
    dq, dk, *decay_outs = pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes)),
        grid=(BH, N, nkb),
        in_specs=[*packed.table_specs(packed_rows), tok(cols(C), q), tok(cols(n), keys), *decays, in_layout(rows(n, V), corrected, heads), state, state,
                  tok(rows(C, V), do)],
        out_specs=(tok(cols(C), q), tok(cols(n), keys), *decay_outs),
        interpret=interpret,
        num_warps=num_warps, num_stages=num_stages,
        name="flowssm_chunk_output_bwd",
    )(*packed.table_args(packed_rows), q, keys, G, G_tok, corrected, S_in, dS_out, do)
    if not decay_grads:
        return dq, dk, None
    dG, dG_tok = decay_outs
    if not per_channel:
        dG, dG_tok = dG.sum(0), dG_tok.sum(0)
    return dq, dk, dG.at[:, :, rank - 1 :: rank].add(dG_tok)


def chunk_output_bwd_reference(q, keys, G, corrected, S_in, dS_out, do, *, rank: int, scale: float,
                               heads: int | None = None, block_k: int = 64, num_warps: int = 4, num_stages: int = 1,
                               interpret: bool | None = None, decay_grads: bool = True):
    """Same contract as :func:`chunk_output_bwd_kernel`, in plain jnp at full precision (all of ``K`` at once)."""
    del block_k, num_warps, num_stages, interpret
    q, keys, do, corrected = (to_head_major(x, heads) for x in (q, keys, do, corrected))
    acc = G.dtype
    block = lambda *a: _output_bwd_block(*a, rank=rank, scale=scale, matmul=reference_dot, operand_dtype=keys.dtype)
    dq, dk, dG, dG_tok = jax.vmap(jax.vmap(block))(
        q, keys, G, decay.token_decays(G, rank), corrected.astype(acc), S_in.astype(acc),
        dS_out.astype(acc), do)
    return (token_major(dq, heads).astype(q.dtype), token_major(dk, heads).astype(keys.dtype),
            dG.at[:, :, rank - 1 :: rank].add(dG_tok) if decay_grads else None)
