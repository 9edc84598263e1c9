"""Intra-chunk kernel: Gram matrix, transfer ``T ~ (I + L)^{-1}`` and the generators ``w, u``.

For one chunk of ``n = C R`` micro-steps (keys ``k``, values ``v``, steps ``b, a``, cumulative decays
``G``):

    L_im = b_i (k_i . k_m) exp(G_i - G_m)  (m < i),    w = T (b e^G k),    u = T (a v)

with ``T`` formed inside the kernel by the solver's transfer program (:mod:`flowssm.solvers.program`,
``program.matrix``: one ``n x n`` tile; ``T = I`` is not formed). The kernel runs whatever program the
solver returns: it never looks at solver classes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flowssm import chunks
from flowssm.kernels import decay, packed
from flowssm.kernels.common import dot, head_major, pallas_call, resolve_interpret
from flowssm.kernels.cumulative_decay import cumulative_decay_kernel, cumulative_decay_vjp_kernel, micro_log_decay
from flowssm.paths import Path
from flowssm.solvers import FlowSolver
from flowssm.solvers.program import ADDITIVE, IDENTITY, INVERSE, TransferProgram


def _key_scores(k, G, *, blocks: int, operand_dtype, rows=None, score_mode: str = "operand",
               channel_block: int | None = None):
    """``(k_i . k_m) e^{G_i - G_m}`` for ``m < i``, else 0: [n, n]; G: [n], [n, K] or None (``G = 0``)
    (``decay.scores``, with its kernel ``rows`` loaders (then ``k, G`` give only shapes and may be refs), its
    matmuls in ``score_mode``, over blocks of ``channel_block`` key channels)."""
    n = k.shape[0]
    if G is not None and len(G.shape) == 2:
        return decay.scores(k, G, k, G, blocks=blocks, rank=1, shift=0, matmul=functools.partial(dot, mode=score_mode),
                            operand_dtype=operand_dtype, rows=rows, channels=channel_block)
    below = lax.broadcasted_iota(jnp.int32, (n, n), 0) > lax.broadcasted_iota(jnp.int32, (n, n), 1)
    gram = dot(k, k, operand_dtype=operand_dtype, trans_b=True)
    if G is None:
        return jnp.where(below, gram, 0.0)
    return jnp.where(below, gram * jnp.exp(jnp.where(below, G[:, None] - G[None, :], 0.0)), 0.0)


def _transfer_block(k_ref, v_ref, b_ref, a_ref, g_ref, w_ref, u_ref, *, program: TransferProgram, operand_dtype,
                    mode, blocks: int, score_mode: str = "operand", channel_block: int | None = None,
                    has_decay: bool = True):
    """One chunk, from and to kernel refs: k: [n, K], v: [n, V], beta, alpha: [n], G: [n] or [n, K] -> w: [n, K],
    u: [n, V] stored; returns ``T: [n, n]`` (float32), or None for ``T = I``. ``blocks``, ``score_mode``: of the
    per-channel scores (:func:`_key_scores`); ``channel_block``: per-channel decays form the scores and
    ``w = T (b e^G * k)`` over blocks of this many key channels (None: all at once), so that only ``[n, block]``
    float32 decay tiles are live. ``has_decay=False``: ``G = 0`` (a path without decays), not read."""
    f32 = g_ref.dtype
    beta = b_ref[...].astype(f32)
    alpha = lambda: a_ref[...].astype(f32)
    if len(g_ref.shape) == 1:  # scalar decays
        G = g_ref[...] if has_decay else None
        scale = beta if G is None else beta * jnp.exp(G)
        if program.structure == IDENTITY:
            w_ref[...] = (scale[:, None] * k_ref[...].astype(f32)).astype(w_ref.dtype)
            u_ref[...] = (alpha()[:, None] * v_ref[...].astype(f32)).astype(u_ref.dtype)
            return None
        k = k_ref[...]
        L = (beta[:, None] * _key_scores(k, G, blocks=blocks, operand_dtype=operand_dtype)).astype(f32)
        T = program.matrix(L, lambda a, b: dot(a, b, operand_dtype=operand_dtype, mode=mode))
        u_ref[...] = dot(T * alpha()[None, :], v_ref[...], operand_dtype=operand_dtype).astype(u_ref.dtype)
        # T (s * k) = (T * s^T) k: the steps scale T's columns, k and v enter the matmuls as they are
        w_ref[...] = dot(T * scale[None, :], k, operand_dtype=operand_dtype).astype(w_ref.dtype)
        return T
    K = k_ref.shape[-1]
    width = K if channel_block is None else min(channel_block, K)
    T = None
    if program.structure != IDENTITY:
        gram = _key_scores(k_ref, g_ref, blocks=blocks, operand_dtype=operand_dtype, score_mode=score_mode,
                           channel_block=width, rows=(decay.ref_rows(k_ref, g_ref),) * 2)
        T = program.matrix((beta[:, None] * gram).astype(f32), lambda a, b: dot(a, b, operand_dtype=operand_dtype,
                                                                                   mode=mode))
    u = alpha()[:, None] * v_ref[...].astype(f32) if T is None else dot(T * alpha()[None, :], v_ref[...],
                                                                         operand_dtype=operand_dtype)
    u_ref[...] = u.astype(u_ref.dtype)

    def store_w(j, carry):  # w over one block of key channels: T (b e^G * k) there
        channels = (slice(None), pl.ds(j * width, width))
        scaled = beta[:, None] * jnp.exp(g_ref[channels]) * k_ref[channels].astype(f32)
        w = scaled if T is None else dot(T, scaled, operand_dtype=operand_dtype)
        w_ref[channels] = w.astype(w_ref.dtype)
        return carry

    lax.fori_loop(0, K // width, store_w, 0)
    return T


def chunk_transfer_kernel(keys, values, beta, alpha, log_decay, *, solver: FlowSolver, mode: str = "operand",
                          save_transfer: bool = False, heads: int | None = None, score_mode: str = "operand",
                          channel_block: int | None = None, num_warps: int = 4, num_stages: int = 1,
                          interpret: bool | None = None, G=None, packed_rows: packed.ChunkTable | None = None,
                          has_decay: bool = True):
    """Generators of every chunk, one program per (head, chunk), ``n = C R`` micro-steps a chunk.

    keys: [BH, N, n, K], values: [BH, N, n, V] (token-major [B, N, n, H, ·] with ``heads=H``, see
    ``common``), beta, alpha: [BH, N, n], log_decay: [BH, N, C] (per token) or [BH, N, C, K] (per token and
    key channel: ``L_im = b_i sum_c k_ic k_mc e^{G_ic - G_mc}``, ``w = T (b e^G * k)``) -> (w: [BH, N, n, K],
    u: [BH, N, n, V]) in the dtype of ``keys`` (the operand dtype), followed by ``T: [BH, N, n, n]`` (same
    dtype) with ``save_transfer`` (programs with ``T = (I + L)^{-1}`` only: the backward's ``T^T``).
    ``mode``: matmul mode of the program's products (see ``common.DOT_MODES``; "f16": chunks whose float16
    products overflowed are formed again at TF32 by a second call, which every other program leaves at once);
    ``score_mode``: of the
    per-channel decayed scores (``launch.Tuning.score_mode``); per-channel decays form the scores and ``w`` over
    blocks of ``channel_block`` key channels (``launch.Tuning.channel_block``). ``G``:
    ``micro_log_decay(log_decay, R)`` where the caller has it (else computed here). ``packed_rows`` (packed sequences
    read in place, :mod:`.packed`): keys and values are the packed rows ``[1, T R, H, ·]``. ``has_decay=False``
    (a path without decays, scalar ``log_decay = 0``): the decays are not read, nor their factors formed.
    """
    V = values.shape[-1]
    BH, N, C = log_decay.shape[:3]
    n, K = beta.shape[2], keys.shape[-1]
    R = n // C
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype
    program = solver.program()
    if save_transfer and program.structure != INVERSE:
        raise ValueError(f"save_transfer: T is saved for programs computing (I + L)^{{-1}} only, got {program!r} "
                         f"(solver {solver!r})")
    G = cumulative_decay_kernel(log_decay, R, interpret=interpret) if G is None else G
    blocks = chunks.score_blocks(n // R)

    flagged = mode == "f16" and program.structure not in (IDENTITY, ADDITIVE)  # T formed by float16 products
    rows = lambda d: pl.BlockSpec((None, None, n, d), lambda i, c: (i, c, 0, 0))
    vec = pl.BlockSpec((None, None, n), lambda i, c: (i, c, 0))
    g_spec = rows(K) if decay.per_channel(G) else vec
    tok = lambda spec, x: packed.operand_spec(spec, heads, x, packed_rows)
    widths = (K, V) + ((n,) if save_transfer else ())
    operands = (*packed.table_args(packed_rows), keys, values, beta, alpha, G)
    in_specs = [*packed.table_specs(packed_rows), tok(rows(K), keys), tok(rows(V), values), vec, vec, g_spec]
    out_shape = [jax.ShapeDtypeStruct((BH, N, n, d), dtype) for d in widths]

    def call(mode: str, redo=None):
        """The generators in matmul ``mode``; with ``flagged`` also ``ok: [BH, N, n]`` (1 where ``T`` is finite).
        ``redo``: (ok, w, u[, T]) of a first call, updated in place: the programs whose ``ok`` is 0 form their
        chunk again."""
        flag = flagged and redo is None

        def kernel(*refs):
            if packed_rows is not None:  # the chunk's rows of the packed operands
                table_ref, *refs = refs
                refs[:2] = (packed.chunk_rows(x, table_ref, pl.program_id(1), n, R) for x in refs[:2])
            k_ref, v_ref, b_ref, a_ref, g_ref, *refs = refs
            if redo is not None:  # the first call's ok, then its outputs (aliased to this call's)
                ok_in, refs = refs[0], refs[1 + len(widths):]
            w_ref, u_ref, *rest = refs

            def chunk():
                T = _transfer_block(k_ref, v_ref, b_ref, a_ref, g_ref, w_ref, u_ref, program=program,
                                    operand_dtype=dtype, mode=mode, blocks=blocks, score_mode=score_mode,
                                    channel_block=channel_block, has_decay=has_decay)
                if save_transfer:
                    rest[0][...] = T.astype(dtype)
                if flag:  # inf or NaN spreads through every later product: one look at T finds an overflow
                    finite = jnp.min(jnp.where(jnp.abs(T) < jnp.inf, 1.0, 0.0))
                    rest[-1][...] = jnp.full((n,), finite, rest[-1].dtype)

            if redo is None:
                chunk()
            else:
                pl.when(ok_in[0] == 0.0)(chunk)

        first = len(operands)
        return pallas_call(
            kernel,
            out_shape=tuple(out_shape + [jax.ShapeDtypeStruct((BH, N, n), jnp.float32)] * flag),
            grid=(BH, N),
            in_specs=in_specs + ([] if redo is None else [vec] + [rows(d) for d in widths]),
            out_specs=tuple([rows(d) for d in widths] + [vec] * flag),
            input_output_aliases={} if redo is None else {first + 1 + j: j for j in range(len(widths))},
            interpret=interpret,
            num_warps=num_warps, num_stages=num_stages,
            name="flowssm_chunk_transfer" if redo is None else "flowssm_chunk_transfer_redo",
        )(*operands, *(() if redo is None else redo))

    if not flagged:
        return call(mode)
    *outputs, ok = call(mode)
    # float16 operands overflowed in some chunk (|x| > 65504): those chunks again at TF32, in place; elsewhere
    # each program reads its flag and returns
    return call("tf32", redo=(ok, *outputs))


def chunk_transfer_reference(keys, values, beta, alpha, log_decay, *, solver: FlowSolver, mode: str = "operand",
                             heads: int | None = None, num_warps: int = 4, num_stages: int = 1,
                             interpret: bool | None = None, G=None):
    """Same contract as :func:`chunk_transfer_kernel`, through ``chunks.build_system`` and ``solver.solve``."""
    del mode, num_warps, num_stages, interpret, G
    keys, values = head_major(keys, heads), head_major(values, heads)
    BH, N, n, _ = keys.shape
    C = log_decay.shape[2]
    f32 = jnp.promote_types(keys.dtype, jnp.float32)
    by_token = lambda x: x.astype(f32).reshape(BH, N, C, n // C, *x.shape[3:])
    path = Path(by_token(keys), by_token(values), by_token(beta), by_token(alpha), log_decay.astype(f32))
    sol = jax.vmap(jax.vmap(lambda c: solver.solve(chunks.build_system(c, "discrete"))))(path)
    return sol.w.astype(keys.dtype), sol.u.astype(keys.dtype)


def _scaled_keys_vjp(drk, k, beta, G):
    """Cotangents through ``rk = b e^G k`` given ``drk: [n, K]``: (dk: [n, K], db: [n], dG: [n] or [n, K])."""
    acc = drk.dtype
    eG = jnp.exp(G)
    if G.ndim == 2:  # d(b e^G k) per entry: the key channels' shares of db and dG
        through_k = drk * k.astype(acc) * eG
        return beta[:, None] * eG * drk, jnp.sum(through_k, axis=1), beta[:, None] * through_k
    through_k = jnp.sum(drk * k.astype(acc), axis=1) * eG
    return (beta * eG)[:, None] * drk, through_k, beta * through_k


def _store(ref, x, share=None):
    """``ref[...] = x + share`` in the dtype of ``ref``: ``share`` (a ref, or None) is the same cotangent's share
    from another kernel, added at ``x``'s precision before the one rounding. ``ref`` None: nothing stored."""
    if ref is not None:
        ref[...] = (x if share is None else x + share[...].astype(x.dtype)).astype(ref.dtype)


def _transfer_bwd_block(k_ref, v_ref, b_ref, a_ref, g_ref, t_ref, w_ref, u_ref, dw, du_ref,
                        dk_ref, dv_ref, db_ref, da_ref, dg_ref, *, exact: bool, operand_dtype, acc, blocks: int,
                        score_mode: str = "operand", dk_share=None, dg_share=None):
    """Cotangents of one chunk's ``w = T rk, u = T rv`` (``rk = b e^G k``, ``rv = a v``), written to the
    ``d*_ref`` blocks; ``dw()`` gives the cotangent of ``w`` (loaded, or formed from ``du`` and the state).
    ``exact``: ``T = (I + L)^{-1}`` (``drk = T^T dw``, ``dL = -(drk w^T + drv u^T)`` below the diagonal, then
    through ``L_im = b_i (k_i . k_m) e^{G_i - G_m}``; per key channel (``G: [n, K]``, then ``dG`` is ``[n, K]``)
    ``L`` is ``decay.scores`` of the rows ``b k`` and the items ``k``: its vjp
    (``decay.scores_vjp``) gives dk, db and dG, the scores are not formed); otherwise ``T = I``.
    ``dk_share``, ``dg_share`` (refs or None): the other shares of dk and dG, added before they are written;
    ``dg_ref`` None: no dG (a path without decays).

    Outputs are written as soon as they are final and operands loaded when first needed: fewer live
    tiles, fewer registers.
    """
    mm = lambda a, b, **kw: dot(a, b, operand_dtype=operand_dtype, **kw)
    loaded = lambda ref: ref[...].astype(acc)
    drv = mm(t_ref[...], du_ref[...], trans_a=True) if exact else du_ref[...].astype(acc)
    _store(dv_ref, a_ref[...].astype(acc)[:, None] * drv)
    _store(da_ref, jnp.sum(drv * v_ref[...].astype(acc), axis=1))
    form_drk = lambda: mm(t_ref[...], dw(), trans_a=True) if exact else dw().astype(acc)
    if not exact:
        dk, db, dG = _scaled_keys_vjp(form_drk(), k_ref[...], loaded(b_ref), loaded(g_ref))
        _store(dk_ref, dk, dk_share)
        _store(db_ref, db)
        _store(dg_ref, dG, dg_share)
        return
    n = g_ref.shape[0]
    below = lax.broadcasted_iota(jnp.int32, (n, n), 0) > lax.broadcasted_iota(jnp.int32, (n, n), 1)
    if len(g_ref.shape) == 2:  # the vjp first, drk formed again after it: fewer live tiles across its loops
        dL = jnp.where(below, -mm(drv, u_ref[...], trans_b=True) - mm(form_drk(), w_ref[...], trans_b=True), 0.0)
        rows = (decay.ref_rows(k_ref, g_ref, scale_ref=b_ref), decay.ref_rows(k_ref, g_ref))  # rows b k, items k
        d_scaled, d_items = decay.scores_vjp(k_ref, g_ref, k_ref, g_ref, dL, blocks=blocks, rank=1, shift=0,
                                             matmul=functools.partial(dot, mode=score_mode),
                                             operand_dtype=operand_dtype, rows=rows)
        dk, db, dG = _scaled_keys_vjp(form_drk(), k_ref[...], loaded(b_ref), loaded(g_ref))
        k, d_rows = loaded(k_ref), loaded(b_ref)[:, None] * d_scaled
        _store(dk_ref, dk + d_rows + d_items, dk_share)
        _store(db_ref, db + jnp.sum(k * d_scaled, axis=1))
        _store(dg_ref, dG + k * (d_rows - d_items), dg_share)
        return
    beta, G = loaded(b_ref), loaded(g_ref)
    dL = -mm(drv, u_ref[...], trans_b=True)
    drk = form_drk()
    k = k_ref[...]
    dk, db, dG = _scaled_keys_vjp(drk, k, beta, G)
    dL = dL - mm(drk, w_ref[...], trans_b=True)
    dL = jnp.where(below, dL, 0.0)
    Z = dL * _key_scores(k, G, blocks=blocks, operand_dtype=operand_dtype)  # d/db_i of L_im
    _store(db_ref, jnp.sum(Z, axis=1) + db)
    _store(dg_ref, dG + beta * jnp.sum(Z, axis=1) - jnp.sum(beta[:, None] * Z, axis=0), dg_share)
    pair_decay = jnp.exp(jnp.where(below, G[:, None] - G[None, :], 0.0))
    dgram = jnp.where(below, dL * pair_decay * beta[:, None], 0.0)
    _store(dk_ref, dk + mm(dgram, k) + mm(dgram, k, trans_a=True), dk_share)


def chunk_transfer_bwd_kernel(keys, values, beta, alpha, log_decay, T, w, u, dw, du, *, solver: FlowSolver,
                              heads: int | None = None, score_mode: str = "operand", num_warps: int = 4,
                              num_stages: int = 1, interpret: bool | None = None, G=None, dG=None, dkeys=None,
                              S_in=None, packed_rows: packed.ChunkTable | None = None, decay_grads: bool = True):
    """Backward of :func:`chunk_transfer_kernel` for programs with ``T = (I + L)^{-1}`` (``T`` saved by the
    forward) or ``T = I`` (``T = None``), one program per (head, chunk).

    Shapes (and ``heads``) as the forward's inputs and outputs; dw: [BH, N, n, K], du: [BH, N, n, V]
    -> (dkeys, dvalues, dbeta, dalpha, dlog_decay) shaped like the inputs: dkeys and dvalues in the dtype of
    ``keys`` and ``values`` (their final dtype: nothing else adds to them), the others in float32 (float64 for
    float64 inputs). ``dkeys`` (shaped like ``keys``) and ``dG`` (shaped like ``G``): the cotangents of the keys
    and of ``G`` from elsewhere (the output backward), added in the kernel in float32 before the one rounding
    of dkeys and the one vjp through :func:`micro_log_decay`.
    ``score_mode``, ``G``: as the forward's.
    ``dw=None`` with the states entering the chunks ``S_in: [BH, N, K, V]``: ``dw = -du S_in^T`` is formed here
    (``w``'s one use is the corrected values ``u - w S_in``, whose cotangent is ``du``), not written by the output
    backward and read back.
    ``packed_rows``: as the forward's (keys, values, dkeys and dvalues are packed rows).
    ``decay_grads=False`` (a path without decays, ``dG`` None): dlog_decay is zeros, not formed.
    """
    V = values.shape[-1]
    BH, N = log_decay.shape[:2]
    n, K = beta.shape[2], keys.shape[-1]
    R = n // log_decay.shape[2]
    structure = solver.program().structure
    exact = structure == INVERSE
    if structure not in (IDENTITY, INVERSE) or exact != (T is not None):
        raise ValueError(f"T: the transfer backward kernel needs a program computing (I + L)^{{-1}} with its saved T, "
                         f"or T = I with T=None; got {solver!r} with T {'given' if T is not None else 'None'}")
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    if (dw is None) == (S_in is None):
        given = lambda x: "given" if x is not None else "None"
        raise ValueError(f"dw, S_in: give exactly one (dw, or S_in to form dw = -du S_in^T), got dw {given(dw)} "
                         f"and S_in {given(S_in)}")
    G = cumulative_decay_kernel(log_decay, R, interpret=interpret) if G is None else G
    shares = [x for x in (dkeys, dG) if x is not None]
    if dG is not None and not decay_grads:
        raise ValueError("dG: a share of the decays' cotangent was given with decay_grads=False")

    def kernel(*refs):
        table_ref, refs = (None, refs) if packed_rows is None else (refs[0], refs[1:])
        k_ref, v_ref, b_ref, a_ref, g_ref, w_ref, u_ref, dw_ref, du_ref, *rest = refs
        form_dw = ((lambda: dw_ref[...]) if dw is not None else  # else dw_ref is S_in's tile
                   (lambda: -dot(du_ref[...], dw_ref[...], operand_dtype=dtype, trans_b=True)))
        t_ref, rest = (rest[0], rest[1:]) if exact else (None, rest)
        dk_share, rest = (rest[0], rest[1:]) if dkeys is not None else (None, rest)
        dg_share, outs = (rest[0], rest[1:]) if dG is not None else (None, rest)
        outs = outs if decay_grads else (*outs, None)
        if packed_rows is not None:  # the chunk's rows of the packed operands (dkeys and dvalues: the first outputs)
            k_ref, v_ref, dk_ref, dv_ref = (packed.chunk_rows(x, table_ref, pl.program_id(1), n, R)
                                            for x in (k_ref, v_ref, *outs[:2]))
            outs = (dk_ref, dv_ref, *outs[2:])
            if dk_share is not None:
                dk_share = packed.chunk_rows(dk_share, table_ref, pl.program_id(1), n, R)
        _transfer_bwd_block(k_ref, v_ref, b_ref, a_ref, g_ref, t_ref, w_ref, u_ref, form_dw, du_ref, *outs,
                            exact=exact, operand_dtype=dtype, acc=acc, blocks=chunks.score_blocks(n // R),
                            score_mode=score_mode, dk_share=dk_share, dg_share=dg_share)

    rows = lambda d: pl.BlockSpec((None, None, n, d), lambda i, c: (i, c, 0, 0))
    vec = pl.BlockSpec((None, None, n), lambda i, c: (i, c, 0))
    g_spec = rows(K) if decay.per_channel(G) else vec
    tk, tv = (packed.operand_spec(rows(d), heads, x, packed_rows) for d, x in ((K, keys), (V, values)))
    shapes = (keys.shape, values.shape, (BH, N, n), (BH, N, n), *[G.shape] * decay_grads)
    dk, dv, db, da, *dG = pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, (keys.dtype, values.dtype) + (acc,) * 3)),
        grid=(BH, N),
        in_specs=[*packed.table_specs(packed_rows), tk, tv, vec, vec, g_spec, rows(K), rows(V),
                  rows(K) if dw is not None else pl.BlockSpec((None, None, K, V), lambda i, c: (i, c, 0, 0)), rows(V)]
        + ([rows(n)] if exact else []) + ([tk] if dkeys is not None else []) + ([g_spec] if dG is not None else []),
        out_specs=(tk, tv, vec, vec, *[g_spec] * decay_grads),
        interpret=interpret,
        num_warps=num_warps, num_stages=num_stages,
        name="flowssm_chunk_transfer_bwd",
    )(*packed.table_args(packed_rows), keys, values, beta, alpha, G, w, u, S_in if dw is None else dw, du,
      *([T] if exact else []), *shares)
    if not decay_grads:
        return dk, dv, db, da, jnp.zeros(log_decay.shape, acc)
    return dk, dv, db, da, cumulative_decay_vjp_kernel(log_decay, dG[0], R, interpret=interpret)


def chunk_transfer_bwd_reference(keys, values, beta, alpha, log_decay, T, w, u, dw, du, *, solver: FlowSolver,
                                 heads: int | None = None, num_warps: int = 4, num_stages: int = 1,
                                 interpret: bool | None = None, G=None, dG=None, dkeys=None, S_in=None,
                                 decay_grads: bool = True):
    """Same contract as :func:`chunk_transfer_bwd_kernel`: the vjp of :func:`chunk_transfer_reference`
    (any solver; ``T``, ``w``, ``u``, ``G`` unused)."""
    del T, w, u, num_warps, num_stages, interpret, G
    acc = jnp.promote_types(keys.dtype, jnp.float32)
    up = lambda x: x.astype(acc)
    if dw is None:
        dw = -jnp.einsum("bcnv,bckv->bcnk", up(du), up(S_in), precision=lax.Precision.HIGHEST)
    ref = lambda *a: chunk_transfer_reference(*a, solver=solver, heads=heads)
    _, vjp = jax.vjp(lambda *a: tuple(x.astype(acc) for x in ref(*a)), *map(up, (keys, values, beta, alpha, log_decay)))
    dk, dv, db, da, dld = vjp((up(dw), up(du)))
    if dkeys is not None:
        dk = dk + up(dkeys)
    if dG is not None:
        R = keys.shape[2] // log_decay.shape[2]
        dld = dld + jax.vjp(lambda ld: micro_log_decay(ld, R), up(log_decay))[1](dG)[0]
    return dk.astype(keys.dtype), dv.astype(values.dtype), db, da, dld if decay_grads else jnp.zeros_like(dld)
