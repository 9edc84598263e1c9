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

Packed sequences (:mod:`flowssm.varlen`'s chunk-aligned layout) run one of two ways:

- ``spans`` (the sequential pass): one program per (head, sequence, column block) runs that sequence's own
  chunks from its initial state; ``S0`` holds the initial states and ``S_final`` the final states (in
  reverse: the final states' cotangents and those of the initial states). Sequences run in parallel, so a
  packed row of ``Ns`` documents has ``Ns`` times the programs of the unpacked pass and a loop as long as
  its longest document. The programs start longest sequence first, so the longest loops do not start last.
- ``resets``, ``h0`` (the passes of the segmented scan, whose segments cut through sequences): at a chunk that
  starts sequence ``i`` the carried state becomes ``h0[i]`` (``[0 | h0[i]]`` for a segment flow) and the
  state leaving a sequence's last chunk is written to ``finals[i]``; in reverse, that chunk's cotangent
  becomes ``dfinals[i]`` (the one from later chunks is cut there) and the cotangent entering a starting
  chunk is written to ``dh0[i]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flowssm.flows import WYFlow, apply
from flowssm.kernels import decay, packed
from flowssm.kernels.chunk_output import attention_block
from flowssm.kernels.common import (dot, head_major, in_layout, layout_dims, pallas_call, reference_dot,
                                    resolve_interpret, to_head_major)
from flowssm import varlen
from flowssm.scan import chunk_states
from flowssm.varlen import Resets, Spans


def _segment_blocks(N: int, segments: int):
    """Chunks a segment and the index map of a ``[., N, ...]`` block of ``M`` chunks for program ``(i, j)``
    (``i = head * segments + segment``), as ``(head, segment)`` block indices of a head-major operand."""
    if segments < 1 or N % segments:
        raise ValueError(f"segments: expected a divisor of the number of chunks {N}, got {segments}")
    return N // segments, lambda i: (i // segments, i % segments)


def _programs(N: int, segments: int, spans: Spans | None, resets: Resets | None, BH: int):
    """(programs a head, chunks a block, the block index map of program row ``i``): ``segments`` stretches of
    ``N / segments`` chunks, or with ``spans`` one program per (sequence rank, head) over all ``N`` chunks of
    its head: row ``i = rank * BH + head`` (:func:`_by_length`)."""
    if spans is None:
        return segments, *_segment_blocks(N, segments)
    if segments != 1 or resets is not None:
        raise ValueError(f"spans: one program per sequence runs without segments or resets, got segments={segments}"
                         f", resets={'set' if resets is not None else None}")
    return spans.first.shape[0], N, lambda i: (i % BH, 0)


def _by_length(spans: Spans, BH: int):
    """The span programs' order, longest sequence first (the GPU starts programs in order, so the longest
    loops start first and short ones fill in behind them; in sequence order a long loop that starts last
    would run on alone at the end): (the spans in that order, ``to_rows``: a per-(head, sequence) array
    ``[BH * Ns, ...]`` in program-row order ``rank * BH + head``, ``from_rows``: back)."""
    Ns = spans.first.shape[0]
    order = jnp.argsort(spans.first - spans.stop, stable=True)  # longest first
    to_rows = lambda x: jnp.swapaxes(x.reshape(BH, Ns, *x.shape[1:])[:, order], 0, 1).reshape(x.shape)
    rank = jnp.argsort(order)
    from_rows = lambda x: jnp.swapaxes(x.reshape(Ns, BH, *x.shape[1:])[rank], 0, 1).reshape(x.shape)
    return Spans(spans.first[order], spans.stop[order]), to_rows, from_rows


def _ids(spans: Spans | None):
    """(row, column) of the running program: with ``spans`` the grid is ``(columns, rows)`` (columns launch
    side by side, the rows in rank order), else ``(rows, columns)``."""
    return (pl.program_id(1), pl.program_id(0)) if spans is not None else (pl.program_id(0), pl.program_id(1))


def _grid(rows: int, columns: int, spans: Spans | None, specs):
    """The grid and the block specs (written as ``index_map(row, column)``) in :func:`_ids`' order."""
    if spans is None:
        return (rows, columns), specs
    swap = lambda spec: dataclasses.replace(spec, index_map=lambda c, r, f=spec.index_map: f(r, c))
    return (columns, rows), [swap(spec) for spec in specs]


def _loop_bounds(spans: Spans | None, refs, BH: int, M: int):
    """The chunks ``[lo, hi)`` of the program's block it runs: its sequence's span, or the whole block."""
    if spans is None:
        return 0, M
    first_ref, stop_ref = refs
    rank = _ids(spans)[0] // BH
    return first_ref[rank], stop_ref[rank]


def _span_specs(spans: Spans | None) -> list[pl.BlockSpec]:
    """Whole-array blocks of the two ``[Ns]`` span vectors (shared by every program); nothing without."""
    return [] if spans is None else [pl.BlockSpec(spans.first.shape, lambda i, j: (0,))] * 2


def _packed_specs(resets: Resets | None, h0_spec: pl.BlockSpec | None) -> list[pl.BlockSpec]:
    """Whole-array blocks of the three ``[N]`` reset vectors (shared by every program) and the block of
    the per-sequence states (``h0`` or ``dfinals``); nothing unpacked."""
    if resets is None:
        return []
    return [pl.BlockSpec(resets.seq.shape, lambda i, j: (0,))] * 3 + ([h0_spec] if h0_spec else [])


def state_pass_kernel(keys, G, w, u, S0, *, heads: int | None = None, write_states: bool = True, segments: int = 1,
                      flow: bool = False, block_v: int = 64, num_warps: int = 4, num_stages: int = 2,
                      interpret: bool | None = None, resets: Resets | None = None, h0=None, zero_h0: bool = False,
                      spans: Spans | None = None, decayed_keys: bool = False,
                      packed_rows: packed.ChunkTable | None = None, rank: int = 1):
    """keys, w: [BH, N, n, K] (keys token-major [B, N, n, H, K] with ``heads=H``); G: [BH, N, n] (or [BH, N, n, K]: per key
    channel, ``S <- diag(e^{G_end}) S + (e^{G_end - G} * k)^T (u - w S)``); u: [BH, N, n, V] (or token-major
    [B, N, n, H, V], by its rank); ``w=None``: ``w = 0`` (additive paths), never read; ``decayed_keys`` (per-channel
    G): ``keys`` are ``k~ = e^{G_end - G} * k`` already (``chunk_transfer.end_keys``, head-major or token-major by
    their rank), and only the last row of each chunk's ``G`` is read;
    S0: [BH * segments, K, V] (float32/64) -> (S_in: [BH, N, K, V] in the dtype of ``keys``, S_final:
    [BH * segments, K, V] in the dtype of ``S0``); with ``write_states=False`` only S_final.

    ``segments``: the ``N`` chunks split into that many stretches of ``M = N / segments``, each run from its
    own ``S0[head * segments + segment]`` by its own programs (the passes of the segmented scan).
    ``flow=True`` (with ``write_states=False``, ``S0=None``): each segment's flow ``[P | Q]``,
    ``S_final: [BH * segments, K, K + V]``, the pass of ``[P | Q]`` from ``[I | 0]`` where the ``P`` columns
    see no values; the ``P`` and ``Q`` column blocks run as separate programs.

    ``resets`` (int32 ``[N]`` vectors) and ``h0: [BH, Ns, K, V]``: packed sequences (module docstring); then
    (unless ``flow``) a last output ``finals: [BH, Ns, K, V]`` in the dtype of ``h0`` (rows of sequences
    owning no chunk are not written). ``zero_h0``: every ``h0`` row is 0; the kernel then never reads
    ``h0`` (only its shape and dtype): a restart multiplies the state by 0, with no tile load in the loop.

    ``spans`` (:class:`flowssm.varlen.Spans`, ``[Ns]`` each; module docstring): one program per (head, sequence
    ``i``, column block), longest sequence first (:func:`_by_length`), runs ``i``'s chunks from
    ``S0[head * Ns + i]``, its initial state (``S0: [BH * Ns, K, V]``); then
    ``S_final: [BH * Ns, K, V]`` holds the final states (an empty sequence's is its initial state), and
    ``zero_h0`` means every ``S0`` row is 0 (never read).

    ``packed_rows`` (packed sequences read in place, :mod:`.packed`): token-major keys are the packed rows
    ``[1, T R, H, K]`` (``rank`` rows a token; keys decayed to the chunk end stay head-major).
    """
    in_place = packed_rows is not None and keys.ndim == 4 and not decayed_keys
    BH, N, n, K = (heads, packed_rows.chunks, G.shape[2], keys.shape[-1]) if in_place else layout_dims(keys, heads)
    restarts = resets is not None
    read_h0 = restarts and not zero_h0
    read_s0 = not flow and not (spans is not None and zero_h0)
    V = u.shape[-1]
    if flow and (write_states or S0 is not None):
        raise ValueError("state_pass_kernel: flow=True computes segment flows from [I | 0]: pass S0=None and "
                         "write_states=False")
    segments, M, seg = _programs(N, segments, spans, resets, BH)
    if spans is not None:
        spans, to_rows, from_rows = _by_length(spans, BH)
        S0 = to_rows(S0) if read_s0 else S0
    bv = min(block_v, K, V) if flow else min(block_v, V)
    p_blocks = K // bv if flow else 0  # column blocks of P (flow mode) before those of the state / Q
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype
    acc = jnp.promote_types(dtype, jnp.promote_types(jnp.float32 if flow else S0.dtype, G.dtype))
    per_channel = decay.per_channel(G)
    if decayed_keys and not per_channel:
        raise ValueError(f"decayed_keys: keys decayed to the chunk end need per-channel G [BH, N, n, K], got G of "
                         f"shape {tuple(G.shape)}")

    def kernel(*refs):
        table_ref, refs = (refs[0], refs[1:]) if in_place else (None, refs)
        k_ref, g_ref, *refs = refs
        if in_place:  # chunk c of the block: the packed rows of chunk c of the segment (spans: of the row)
            first = 0 if spans is not None else _ids(spans)[0] % segments * M
            k_ref = packed.Chunks(k_ref, table_ref, first, n, rank)
        w_ref, refs = (None, refs) if w is None else (refs[0], refs[1:])
        u_ref, refs = refs[0], refs[1:]
        s0_ref, refs = (refs[0], refs[1:]) if read_s0 else (None, refs)
        span_refs, refs = (refs[:2], refs[2:]) if spans is not None else (None, refs)
        (seq_ref, start_ref, end_ref), refs = (refs[:3], refs[3:]) if restarts else ((None,) * 3, refs)
        h0_ref, refs = (refs[0], refs[1:]) if read_h0 else (None, refs)
        fin_ref, refs = (refs[-1], refs[:-1]) if restarts and not flow else (None, refs)
        *s_in_ref, s_out_ref = refs
        row, j = _ids(spans)
        base = row % segments * M  # the segment's first chunk
        if flow:  # P columns start at the identity and see no values; Q columns start at 0
            rows, cols = lax.broadcasted_iota(jnp.int32, (K, bv), 0), lax.broadcasted_iota(jnp.int32, (K, bv), 1)
            start = ((rows == cols + j * bv) & (j < p_blocks)).astype(acc)
            values = jnp.clip(j - p_blocks + 1, 0, 1).astype(acc)  # 0 for P columns (Triton: no scalar select)
        else:
            start = s0_ref[...].astype(acc) if read_s0 else jnp.zeros((K, bv), acc)
            values = 1.0

        def step(c, S):
            if restarts:
                seq = seq_ref[base + c]
                if read_h0:
                    restart = h0_ref[seq].astype(S.dtype) * values  # [0 | h0] for a segment flow
                    S = jnp.where(start_ref[base + c] > 0, restart, S)
                else:
                    S = S * (1 - start_ref[base + c]).astype(S.dtype)
            if write_states:
                s_in_ref[0][c] = S.astype(dtype)
            G_end = g_ref[c, n - 1]
            corrected = values * u_ref[c].astype(S.dtype)
            if w_ref is not None:
                corrected = corrected - dot(w_ref[c], S, operand_dtype=dtype)
            if per_channel:  # k~ = e^{G_end - G} * k per channel, S's rows decay by e^{G_end}
                k_end = k_ref[c] if decayed_keys else jnp.exp(G_end[None, :] - g_ref[c]) * k_ref[c].astype(G_end.dtype)
                S = jnp.exp(G_end).astype(S.dtype)[:, None] * S + dot(k_end, corrected, operand_dtype=dtype,
                                                                     trans_a=True)
            else:  # k~^T r = k^T (e^{G_end - G} r)
                corrected = jnp.exp(G_end - g_ref[c]).astype(S.dtype)[:, None] * corrected
                S = jnp.exp(G_end).astype(S.dtype) * S + dot(k_ref[c], corrected, operand_dtype=dtype, trans_a=True)
            if fin_ref is not None:

                @pl.when(end_ref[base + c] > 0)
                def _():
                    fin_ref[seq] = S.astype(fin_ref.dtype)

            return S

        s_out_ref[...] = lax.fori_loop(*_loop_bounds(spans, span_refs, BH, M), step, start).astype(s_out_ref.dtype)

    whole = lambda d: pl.BlockSpec((None, M, n, d), lambda i, j: (*seg(i), 0, 0))
    u_col = (lambda j: jnp.maximum(j - p_blocks, 0)) if flow else (lambda j: j)
    state = pl.BlockSpec((None, K, bv), lambda i, j: (i, 0, j))
    states = pl.BlockSpec((None, M, K, bv), lambda i, j: (*seg(i), 0, j))
    out_dtype = acc if flow else S0.dtype
    S_final = jax.ShapeDtypeStruct((BH * segments, K, K + V if flow else V), out_dtype)
    g_spec = whole(K) if per_channel else pl.BlockSpec((None, M, n), lambda i, j: (*seg(i), 0))
    table = packed_rows if in_place else None
    key_spec = packed.rows_spec(whole(K), heads, keys.shape[1]) if in_place else in_layout(whole(K), keys, heads)
    in_specs = [*packed.table_specs(table), key_spec, g_spec, *([] if w is None else [whole(K)]),
                in_layout(pl.BlockSpec((None, M, n, bv), lambda i, j: (*seg(i), 0, u_col(j))), u, heads)]
    per_seq = lambda col: pl.BlockSpec((None, *h0.shape[1:3], bv), lambda i, j: (i // segments, 0, 0, col(j)))
    out_shape = ((jax.ShapeDtypeStruct((BH, N, K, V), dtype), S_final) if write_states else (S_final,))
    out_specs = (states, state) if write_states else (state,)
    if restarts and not flow:
        out_shape, out_specs = (*out_shape, jax.ShapeDtypeStruct(h0.shape, h0.dtype)), (*out_specs, per_seq(lambda j: j))
    in_specs = in_specs + [state] * read_s0 + _span_specs(spans) + _packed_specs(resets, read_h0 and per_seq(u_col))
    grid, specs = _grid(BH * segments, (K + V if flow else V) // bv, spans, [*in_specs, *out_specs])
    out = pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=specs[:len(in_specs)],
        out_specs=tuple(specs[len(in_specs):]),
        interpret=interpret,
        num_warps=num_warps, num_stages=num_stages,
        name="flowssm_segment_flows" if flow else "flowssm_state_pass",
    )(*packed.table_args(table), keys, G, *(() if w is None else (w,)), u, *((S0,) if read_s0 else ()),
      *(spans or ()),
      *(resets if restarts else ()),
      *((h0,) if read_h0 else ()))
    if spans is not None:  # S_final back from program-row order
        out = (*out[:-1], from_rows(out[-1]))
    return out if len(out) > 1 else out[0]


def chunk_flows(keys, G, w, u, decayed_keys: bool = False) -> WYFlow:
    """The chunks' flows ``P = e^{G_end} I - (e^{G_end - G} k)^T w``, ``Q = (e^{G_end - G} k)^T u`` (float32;
    ``e^{G_end}`` a diagonal for per-channel ``G: [BH, N, n, K]``). Head-major keys and ``u``; ``w=None``: 0;
    ``decayed_keys``: the keys are ``e^{G_end - G} k`` already."""
    f32 = G.dtype
    w = jnp.zeros(keys.shape, f32) if w is None else w
    G_end = G[:, :, -1]
    to_end = jnp.exp(G_end[:, :, None] - G)
    k_end = keys.astype(f32)
    if not decayed_keys:
        k_end = (to_end if decay.per_channel(G) else to_end[..., None]) * k_end
    return WYFlow(G_end, k_end, w.astype(f32), u.astype(f32))


def _by_segment(x, segments: int):
    """Head-major [BH, N, ...] -> [BH * segments, N / segments, ...] (program order of the kernels)."""
    return x.reshape(x.shape[0] * segments, x.shape[1] // segments, *x.shape[2:])


def state_pass_reference(keys, G, w, u, S0, *, heads: int | None = None, write_states: bool = True, segments: int = 1,
                         flow: bool = False, block_v: int = 64, num_warps: int = 4, num_stages: int = 2,
                         interpret: bool | None = None, resets: Resets | None = None, h0=None,
                         zero_h0: bool = False, spans: Spans | None = None, decayed_keys: bool = False):
    """Same contract as :func:`state_pass_kernel`, through ``flowssm.scan.chunk_states`` (sequential), or
    ``flowssm.varlen.chunk_states`` when packed (there an empty sequence's final state is its ``h0`` row);
    ``spans`` through the resets they imply (:func:`flowssm.varlen.span_resets`)."""
    del block_v, num_warps, num_stages, interpret, zero_h0  # h0 is read either way
    if spans is not None:
        _programs(G.shape[1], segments, spans, resets, G.shape[0])  # the kernel's argument check
        BH, N, K = G.shape[0], G.shape[1], layout_dims(keys, heads)[-1]
        S_in, _, finals = state_pass_reference(keys, G, w, u, jnp.zeros((BH, K, u.shape[-1]), S0.dtype), heads=heads,
                                               resets=varlen.span_resets(spans, N),
                                               h0=S0.reshape(BH, -1, *S0.shape[1:]), decayed_keys=decayed_keys)
        finals = finals.reshape(S0.shape)
        return (S_in, finals) if write_states else finals
    keys, u = to_head_major(keys, heads), to_head_major(u, heads)
    w = jnp.zeros(keys.shape, keys.dtype) if w is None else w
    BH, N, n, K = keys.shape
    V = u.shape[-1]
    M, _ = _segment_blocks(N, segments)
    if flow:  # the pass of [P | Q] from [I | 0], the P columns without values
        u = jnp.concatenate([jnp.zeros((*u.shape[:-1], K), u.dtype), u], axis=-1)
        S0 = jnp.broadcast_to(jnp.eye(K, K + V, dtype=jnp.promote_types(jnp.float32, G.dtype)), (BH * segments, K, K + V))
    flows = chunk_flows(*(_by_segment(x, segments) for x in (keys, G, w, u)), decayed_keys)
    if resets is None:
        S_in, S_final = jax.vmap(lambda f, s: chunk_states(f, s, "sequential"))(flows, S0)
    else:
        restart = jnp.concatenate([jnp.zeros((*h0.shape[:-1], K), h0.dtype), h0], axis=-1) if flow else h0
        pieces = Resets(*(x.reshape(segments, M) for x in resets))
        one = lambda f, s, i: varlen.chunk_states(f, restart[i // segments], jax.tree.map(lambda x: x[i % segments],
                                                                                          pieces), "sequential", S0=s)[0]
        S_in = jax.vmap(one)(flows, S0, jnp.arange(BH * segments))
        S_final = apply(jax.tree.map(lambda x: x[:, -1], flows), S_in[:, -1])  # each program's end state
    S_final = S_final.astype(S0.dtype)
    out = (S_in.reshape(BH, N, K, -1).astype(keys.dtype), S_final) if write_states else (S_final,)
    if resets is not None and not flow:
        unsplit = lambda x: x.reshape(BH, N, *x.shape[2:])
        finals = jax.vmap(lambda f, s, h: varlen.final_states(f, s, h, resets))(jax.tree.map(unsplit, flows),
                                                                                unsplit(S_in), h0)
        out = (*out, finals.astype(h0.dtype))
    return out if len(out) > 1 else out[0]


def _reverse_step(q, k, w, G, G_tok, G_end, do, dS, *, rank: int, scale: float, matmul, operand_dtype,
                  rows=None, att=None):
    """One chunk of the reverse pass. q: [C, K], k, w: [n, K] (``w=None``: 0), G: [n], G_tok: [C], G_end: [] (or
    [n, K], [C, K], [K] per key channel), do: [C, v], dS: [K, v] -> (dv': [n, v], dS entering the chunk: [K, v]).
    ``att`` ([C, n]): the chunk's attention block saved by the forward, else computed here."""
    acc = dS.dtype
    mm = lambda a, b, **kw: matmul(a, b, operand_dtype=operand_dtype, **kw)
    if att is None:
        att = attention_block(q, k, G, G_tok, rank=rank, matmul=matmul, operand_dtype=operand_dtype, rows=rows)
    if G.ndim == 2:  # per channel: the decays scale the key channels of k and q
        k_end = jnp.exp(G_end[None, :] - G) * k.astype(acc)
        dv = scale * mm(att, do, trans_a=True) + mm(k_end, dS)
        q_decay = jnp.exp(G_tok) * q.astype(acc)
        dS_in = jnp.exp(G_end)[:, None] * dS + mm(q_decay, scale * do.astype(acc), trans_a=True)
        return dv, dS_in if w is None else dS_in - mm(w, dv, trans_a=True)
    # decays scale the small [rows, v] tiles, not the [rows, K] operands: fewer live float32 tiles
    dv = scale * mm(att, do, trans_a=True) + jnp.exp(G_end - G).astype(acc)[:, None] * mm(k, dS)
    do_decay = (scale * jnp.exp(G_tok)).astype(acc)[:, None] * do.astype(acc)
    dS_in = jnp.exp(G_end).astype(acc) * dS + mm(q, do_decay, trans_a=True)
    return dv, dS_in if w is None else dS_in - mm(w, dv, trans_a=True)


def state_pass_bwd_kernel(q, keys, G, w, do, dS_final, *, rank: int, scale: float, heads: int | None = None,
                          segments: int = 1, write_states: bool = True, block_v: int = 64, num_warps: int = 4,
                          num_stages: int = 2, interpret: bool | None = None, resets: Resets | None = None,
                          dfinals=None, zero_dfinals: bool = False, spans: Spans | None = None, scores=None,
                          packed_rows: packed.ChunkTable | None = None):
    """Reverse pass over chunks, one program per (head, segment, block of ``V`` columns).

    q: [BH, N, C, K], keys, w: [BH, N, n, K] (``w=None``: 0, never read), G: [BH, N, n] (cumulative),
    do: [BH, N, C, V] (cotangent of
    the outputs; q, keys and do token-major with ``heads=H``), dS_final: [BH * segments, K, V] (the cotangent
    of the state leaving each segment) -> (dS_out: [BH, N, K, V] (cotangent of the state leaving each chunk)
    and dv': [BH, N, n, V], both in the dtype of ``keys``; dS0: [BH * segments, K, V], the cotangent of the
    state entering each segment, in the dtype of ``dS_final``); with ``write_states=False`` only dS0.
    ``segments`` as in :func:`state_pass_kernel`. Packed (``resets``, ``dfinals: [BH, Ns, K, V]``, the final
    states' cotangents; module docstring): with ``write_states`` a last output ``dh0: [BH, Ns, K, V]`` in the
    dtype of ``dfinals`` (rows of sequences owning no chunk are not written). ``zero_dfinals``: every
    ``dfinals`` row is 0; it is then never read (only its shape and dtype), the cotangent is cut by a product.
    ``spans`` (module docstring): the program of (head, sequence ``i``) runs ``i``'s chunks in reverse from
    ``dS_final[head * Ns + i]``, the cotangent of its final state (``dS_final: [BH * Ns, K, V]``; with
    ``zero_dfinals`` never read); ``dS0: [BH * Ns, K, V]`` is then that of its initial state.
    ``scores`` ([BH, N, C, n], ``chunk_output_kernel(save_scores=True)``): the attention blocks, read instead
    of recomputed (per-channel decays: their ``decay.scores`` loops then leave the serial loop).
    ``packed_rows`` (packed sequences read in place, :mod:`.packed`): q, keys and do are the packed rows
    ``[1, T, H, K]``, ``[1, T R, H, K]``, ``[1, T, H, V]``.
    """
    restarts = resets is not None
    read_dfinals = restarts and not zero_dfinals
    read_dsf = not (spans is not None and zero_dfinals)
    n = G.shape[2]
    BH, N, C, K = layout_dims(q, heads) if packed_rows is None else (heads, packed_rows.chunks, n // rank,
                                                                     q.shape[-1])
    V = do.shape[-1]
    segments, M, seg = _programs(N, segments, spans, resets, BH)
    if spans is not None:
        spans, to_rows, from_rows = _by_length(spans, BH)
        dS_final = to_rows(dS_final) if read_dsf else dS_final
    bv = min(block_v, V)
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype
    G_tok = decay.token_decays(G, rank)
    per_channel = decay.per_channel(G)

    def kernel(*refs):
        table_ref, refs = (None, refs) if packed_rows is None else (refs[0], refs[1:])
        q_ref, k_ref, g_ref, gt_ref, *refs = refs
        w_ref, refs = (None, refs) if w is None else (refs[0], refs[1:])
        do_ref, refs = refs[0], refs[1:]
        if packed_rows is not None:  # chunk c of the block: the packed rows of chunk c of the segment
            first = 0 if spans is not None else _ids(spans)[0] % segments * M
            q_ref, k_ref, do_ref = (packed.Chunks(x, table_ref, first, size, per_token) for x, size, per_token in
                                    ((q_ref, C, 1), (k_ref, n, rank), (do_ref, C, 1)))
        a_ref, refs = (refs[0], refs[1:]) if scores is not None else (None, refs)
        dsf_ref, refs = (refs[0], refs[1:]) if read_dsf else (None, refs)
        span_refs, refs = (refs[:2], refs[2:]) if spans is not None else (None, refs)
        (seq_ref, start_ref, end_ref), outs = (refs[:3], refs[3:]) if restarts else ((None,) * 3, refs)
        dfin_ref, outs = (outs[0], outs[1:]) if read_dfinals else (None, outs)
        dh0_ref, outs = (outs[-1], outs[:-1]) if restarts and write_states else (None, outs)
        *written, ds0_ref = outs
        acc = jnp.promote_types(dtype, jnp.promote_types(dS_final.dtype, g_ref.dtype))
        base = _ids(spans)[0] % segments * M  # the segment's first chunk
        lo, hi = _loop_bounds(spans, span_refs, BH, M)

        def step(i, dS):
            c = lo + hi - 1 - i  # i runs over [lo, hi): c from hi - 1 down to lo
            if restarts:  # the cotangent of a sequence's final state enters at its last chunk
                seq = seq_ref[base + c]
                if read_dfinals:
                    dS = jnp.where(end_ref[base + c] > 0, dfin_ref[seq].astype(acc), dS)
                else:
                    dS = dS * (1 - end_ref[base + c]).astype(acc)
            if write_states:
                written[0][c] = dS.astype(written[0].dtype)
            w_c = None if w_ref is None else w_ref[c]
            dv, dS = _reverse_step(q_ref[c], k_ref[c], w_c, g_ref[c], gt_ref[c], g_ref[c, n - 1], do_ref[c], dS,
                                   rank=rank, scale=scale, matmul=dot, operand_dtype=dtype,
                                   rows=(decay.ref_rows(q_ref, gt_ref, c), decay.ref_rows(k_ref, g_ref, c)),
                                   att=None if a_ref is None else a_ref[c])
            if write_states:
                written[1][c] = dv.astype(written[1].dtype)
            if dh0_ref is not None:

                @pl.when(start_ref[base + c] > 0)
                def _():
                    dh0_ref[seq] = dS.astype(dh0_ref.dtype)

            if restarts:  # a starting chunk reads h0, not the state before it: no cotangent flows back
                dS = dS * (1 - start_ref[base + c]).astype(acc)
            return dS

        init = dsf_ref[...].astype(acc) if read_dsf else jnp.zeros((K, bv), acc)
        ds0_ref[...] = lax.fori_loop(lo, hi, step, init).astype(ds0_ref.dtype)

    whole = lambda r, d: pl.BlockSpec((None, M, r, d), lambda i, j: (*seg(i), 0, 0))
    cols = lambda r: pl.BlockSpec((None, M, r, bv), lambda i, j: (*seg(i), 0, j))
    vec = lambda r: pl.BlockSpec((None, M, r), lambda i, j: (*seg(i), 0))
    state = pl.BlockSpec((None, K, bv), lambda i, j: (i, 0, j))
    dS0 = jax.ShapeDtypeStruct((BH * segments, K, V), dS_final.dtype)
    written = (jax.ShapeDtypeStruct((BH, N, K, V), dtype), jax.ShapeDtypeStruct((BH, N, n, V), dtype))
    out_shape, out_specs = ((*written, dS0), (cols(K), cols(n), state)) if write_states else ((dS0,), (state,))
    per_seq = restarts and pl.BlockSpec((None, *dfinals.shape[1:3], bv), lambda i, j: (i // segments, 0, 0, j))
    if restarts and write_states:
        out_shape, out_specs = (*out_shape, jax.ShapeDtypeStruct(dfinals.shape, dfinals.dtype)), (*out_specs, per_seq)
    tok = lambda spec, x: packed.operand_spec(spec, heads, x, packed_rows)
    in_specs = ([*packed.table_specs(packed_rows), tok(whole(C, K), q),
                 tok(whole(n, K), keys), *((whole(n, K), whole(C, K)) if per_channel else (vec(n), vec(C))),
                 *([] if w is None else [whole(n, K)]),
                 tok(cols(C), do)] + [whole(C, n)] * (scores is not None) + [state] * read_dsf
                + _span_specs(spans)
                + _packed_specs(resets, read_dfinals and per_seq))
    grid, specs = _grid(BH * segments, V // bv, spans, [*in_specs, *out_specs])
    out = pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=specs[:len(in_specs)],
        out_specs=tuple(specs[len(in_specs):]),
        interpret=interpret,
        num_warps=num_warps, num_stages=num_stages,
        name="flowssm_state_pass_bwd",
    )(*packed.table_args(packed_rows), q, keys, G, G_tok, *(() if w is None else (w,)), do,
      *(() if scores is None else (scores,)),
      *((dS_final,) if read_dsf else ()),
      *(spans or ()), *(resets if restarts else ()), *((dfinals,) if read_dfinals else ()))
    if spans is not None:  # dS0 back from program-row order
        out = (*out[:-1], from_rows(out[-1]))
    return out if len(out) > 1 else out[0]


def state_pass_bwd_reference(q, keys, G, w, do, dS_final, *, rank: int, scale: float, heads: int | None = None,
                             segments: int = 1, write_states: bool = True, block_v: int = 64, num_warps: int = 4,
                             num_stages: int = 2, interpret: bool | None = None, resets: Resets | None = None,
                             dfinals=None, zero_dfinals: bool = False, spans: Spans | None = None, scores=None):
    """Same contract as :func:`state_pass_bwd_kernel`: a ``lax.scan`` in reverse at full precision (packed: an
    empty sequence's dh0 row is 0; ``spans``: through the resets they imply, an empty sequence's ``dS0`` row
    is its ``dS_final`` row; the attention blocks are always recomputed, ``scores`` is not read)."""
    del block_v, num_warps, num_stages, interpret, zero_dfinals, scores  # dfinals is read either way
    if spans is not None:
        _programs(G.shape[1], segments, spans, resets, G.shape[0])  # the kernel's argument check
        BH, N = G.shape[:2]
        dfin = dS_final.reshape(BH, -1, *dS_final.shape[1:])
        resets = varlen.span_resets(spans, N)
        zero = jnp.zeros((BH, *dS_final.shape[1:]), dS_final.dtype)
        dS_out, dv, _, dh0 = state_pass_bwd_reference(q, keys, G, w, do, zero, rank=rank, scale=scale, heads=heads,
                                                      resets=resets, dfinals=dfin)
        owns = varlen.nonempty(resets, dfin.shape[1])[None, :, None, None]
        dS0 = jnp.where(owns, dh0, dfin).reshape(dS_final.shape)
        return (dS_out, dv, dS0) if write_states else dS0
    q, keys, do = (head_major(x, heads) for x in (q, keys, do))
    w = jnp.zeros(keys.shape, keys.dtype) if w is None else w
    BH, N = G.shape[:2]
    M, _ = _segment_blocks(N, segments)
    acc = dS_final.dtype
    restarts = resets is not None
    if not restarts:  # no start, no end: nothing injected or read out
        resets = Resets(*(jnp.zeros(N, jnp.int32) for _ in range(3)))
        dfinals = jnp.zeros((BH, 1, *dS_final.shape[1:]), acc)
    pieces = Resets(*(x.reshape(segments, M) for x in resets))

    def one_program(q, k, G, w, do, dS, i):
        dfinal, piece = dfinals[i // segments].astype(acc), jax.tree.map(lambda x: x[i % segments], pieces)

        def step(carry, x):
            dS, dh0 = carry
            q, k, G, w, do, seq, start, end = x
            dS = jnp.where(end > 0, dfinal[seq], dS)
            dv, dS_prev = _reverse_step(q, k, w, G, G[rank - 1 :: rank], G[-1], do, dS, rank=rank, scale=scale,
                                        matmul=reference_dot, operand_dtype=keys.dtype)
            dh0 = jnp.where(start > 0, dh0.at[seq].set(dS_prev), dh0)
            return (jnp.where(start > 0, 0.0, dS_prev), dh0), (dS, dv)  # a start reads h0, not the earlier state

        init = (dS.astype(acc), jnp.zeros_like(dfinal))
        (dS0, dh0), (dS_out, dv) = lax.scan(step, init, (q, k, G, w, do, *piece), reverse=True)
        return dS_out, dv, dS0, dh0

    split = (_by_segment(x, segments) for x in (q, keys, G, w, do))
    dS_out, dv, dS0, dh0 = jax.vmap(one_program)(*split, dS_final, jnp.arange(BH * segments))
    if not write_states:
        return dS0
    unsplit = lambda x: x.reshape(BH, N, *x.shape[2:]).astype(keys.dtype)
    out = (unsplit(dS_out), unsplit(dv), dS0)
    return (*out, dh0.reshape(BH, segments, *dh0.shape[1:]).sum(axis=1).astype(dfinals.dtype)) if restarts else out
