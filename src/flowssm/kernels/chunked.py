"""``backend="pallas"``: the chunked flow computation as Pallas kernels, forward and backward.

Forward:

1. ``chunk_transfer``: per (head, chunk), ``w, u`` from the chunk's system (Gram matrix and ``T``).
2. the scan, giving the state entering every chunk: ``sequential`` runs the ``state_pass`` kernel over
   all chunks; ``associative`` runs a two-level (segmented) scan of the same composition law
   (:func:`segmented_states`: segment flows in parallel, an associative scan over segments in XLA, then
   the state pass inside every segment in parallel). ``Tuning(assoc="xla")`` uses
   ``jax.lax.associative_scan`` over dense chunk flows instead.
3. ``chunk_output``: per (head, chunk), corrected values and outputs; or, where the Mosaic state pass of step 2
   (sequential, or the segmented scan's last pass) runs on more than half the GPU (``Tuning.output``), that
   pass computes them from the state tile it holds, and without a backward writes no states.

Before them, ``cumulative_decay``: the decays ``G`` of every micro-step and, for per-channel decays on the
kernels' passes, the keys decayed to their chunk's end (the state passes' operand). Paths without
multiplicative steps (the ``Additive`` solver, ``program.ADDITIVE``: linear attention) skip step 1: ``w = 0``
is neither formed nor read (``w=None`` in the kernels) and ``u = a v`` is read token-major; their backward has
no transfer step and no ``dw``.

Backward (``Tuning(backward="kernels")``, a ``jax.custom_vjp`` over the three stages; residuals are the
inputs, ``w, u``, the states entering the chunks and, for exact programs, the chunks' ``T``):

1. ``state_pass_bwd``: the reverse pass of the state cotangent, giving ``dv'`` and the cotangent of the
   state leaving every chunk: sequential over chunks, or segmented like the forward
   (:func:`segmented_cotangents`) when the forward's scan was segmented.
2. ``chunk_output_bwd``: per (head, chunk), ``dq`` and the shares of ``dk, dG``.
3. ``chunk_transfer_bwd``: per (head, chunk), ``dw = -dv' S_in^T`` (``w``'s one use is ``u - w S_in``), then
   through ``w = T (b e^G k), u = T (a v)`` with the saved
   ``T`` (programs computing ``(I + L)^{-1}``: every exact method) or ``T = I`` (euler), adding step 2's shares
   of dk and dG before it writes (dk, like dq and dv, leaves in the input dtype); other programs
   (the truncated series of ``signature``) take this step by autodiff of the jnp reference (XLA).

``Tuning(backward="reference")`` differentiates the jnp references of the three stages instead (XLA).
Inputs are padded exactly: ``T`` to whole chunks and ``R`` to a power of two with identity micro-steps,
``K`` and ``V`` with zeros to powers of two >= 16 (the kernels' block shapes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from flowssm.kernels import decay, packed
from flowssm.kernels.chunk_output import chunk_output_bwd_kernel, chunk_output_kernel, chunk_output_reference
from flowssm.kernels.chunk_transfer import (chunk_transfer_bwd_kernel, chunk_transfer_bwd_reference,
                                            chunk_transfer_kernel, chunk_transfer_reference)
from flowssm.kernels.common import head_major, layout_dims, resolve_interpret, to_head_major, token_major
from flowssm.kernels.cumulative_decay import cumulative_decay_kernel, cumulative_decay_vjp_kernel, micro_log_decay
from flowssm.kernels.launch import Tuning, auto_segments, fuse_output
from flowssm.kernels.state_pass import chunk_flows, state_pass_bwd_kernel, state_pass_kernel, state_pass_reference
from flowssm.kernels.state_pass_mosaic import flow_fits, mosaic_runs, state_pass_bwd_mosaic, state_pass_mosaic
from flowssm import varlen
from flowssm.flows import DenseFlow
from flowssm.paths import Path, map_path, pad_path
from flowssm.scan import chunk_states
from flowssm.solvers import FlowSolver
from flowssm.solvers.program import ADDITIVE, IDENTITY, INVERSE

MAX_ELEMENTS = 2**31 - 1  # the largest array a kernel indexes with int32 offsets
# pieces of a longer sequence hold a multiple of this many chunks: the segmented scan splits a piece into
# segments by a divisor of its chunk count (8191 chunks, a prime, would leave it a single segment)
PIECE_ALIGN = 256


def _pow2(x: int, floor: int = 1) -> int:
    return max(floor, 1 << (x - 1).bit_length())


def _pad_to(x, sizes: dict[int, int]):
    return jnp.pad(x, [(0, sizes.get(a, d) - d) for a, d in enumerate(x.shape)])


def operand_dtype(q, path: Path):
    """Matmul operand dtype: the query's (bf16 inputs -> bf16 tensor cores), float64 for float64 paths."""
    return jnp.float64 if path.keys.dtype == jnp.float64 else q.dtype


def _highest(fn):
    """Trace ``fn`` with float32 matmuls at full precision (XLA's GPU default would round them to TF32)."""
    @functools.wraps(fn)
    def run(*args):
        with jax.default_matmul_precision("highest"):
            return fn(*args)
    return run


@_highest
def _segment_starts(P, Q, S0):
    """States entering each segment from the segments' flows. P: [BH, S, K, K], Q: [BH, S, K, V], S0: [BH, K, V]
    -> (starts: [BH, S, K, V], final: [BH, K, V]); an associative scan over segments (depth ``log2 S``)."""
    return jax.vmap(lambda f, s: chunk_states(f, s, "associative"))(DenseFlow(P, Q), S0)


@_highest
def _segment_cotangent_ends(P, b, dS_final):
    """Cotangents of the states leaving each segment: ``dS_end[S-1] = dS_final``,
    ``dS_end[s] = P[s+1]^T dS_end[s+1] + b[s+1]`` (``b``: each segment's reverse pass from 0).
    P: [BH, S, K, K], b: [BH, S, K, V] -> (dS_end: [BH, S, K, V], dS0 = P[0]^T dS_end[0] + b[0])."""
    reverse = lambda x: jnp.flip(x, axis=1)
    ends, dS0 = jax.vmap(lambda f, s: chunk_states(f, s, "associative"))(
        DenseFlow(reverse(jnp.swapaxes(P, -1, -2)), reverse(b)), dS_final)
    return reverse(ends), dS0


def segmented_states(keys, G, w, u, S0, segments: int, *, heads: int | None, tuning: Tuning, resets=None, h0=None,
                     zero_h0: bool = False, mosaic: bool = False, decayed_keys: bool = False, packed_rows=None, rank: int = 1,
                     write_states: bool = True, **output):
    """The segmented (two-level) scan, forward. keys: [BH, N, n, K] (token-major with ``heads``), G: [BH, N, n]
    (or [BH, N, n, K]), w: [BH, N, n, K], u: [BH, N, n, V], S0: [BH, K, V] -> (S_in: [BH, N, K, V] in the dtype of ``keys``,
    S_final: [BH, K, V], P: [BH, segments, K, K], the segments' transition matrices, for the backward).

    The ``N`` chunks form ``segments`` stretches of ``M``: (1) every segment's flow ``[P | Q]``, in parallel
    over (head, segment, column block); (2) an associative scan over the segment flows (XLA) gives the
    state entering each segment; (3) the state pass inside every segment, in parallel, from those states.
    Depth ``2 M + log2(segments)`` chunk steps instead of ``N``, for twice the state-pass arithmetic.
    ``mosaic``: steps (1) and (3) on Mosaic GPU (``state_pass_mosaic``; unpacked only). ``decayed_keys``: as in
    ``state_pass_kernel`` (Triton only).
    Packed sequences (``resets``, ``h0``, ``zero_h0``: see ``state_pass``): the passes restart at sequence starts, so
    a segment holding a start has a flow independent of earlier segments; a last output, the final states.
    ``packed_rows``, ``rank``: packed keys read in place (``state_pass_kernel``). ``output`` (Mosaic: ``q``,
    ``scale``, ``save_corrected``): step (3) also computes the outputs (``state_pass_mosaic``), the last outputs;
    with ``write_states=False`` (then S_in is None) it writes no ``S_in``.
    """
    BH, N, K, V = G.shape[0], G.shape[1], keys.shape[-1], u.shape[-1]
    opts = dict(heads=heads, segments=segments, block_v=tuning.block_v)
    opts |= (dict(num_stages=tuning.mosaic_stages) if mosaic else
             dict(num_warps=tuning.state_warps, num_stages=tuning.state_stages, decayed_keys=decayed_keys,
                  packed_rows=packed_rows, rank=rank, **({} if resets is None else dict(resets=resets, h0=h0, zero_h0=zero_h0))))
    state_pass = functools.partial(state_pass_mosaic if mosaic else state_pass_kernel, **opts)
    flow = state_pass(keys, G, w, u, None, flow=True, write_states=False,
                      block_v=flow_block(tuning, keys.dtype, G.shape[2], K, V, mosaic))
    flow = flow.reshape(BH, segments, K, K + V)
    P = flow[..., :K]
    starts, S_final = _segment_starts(P, flow[..., K:], S0.astype(flow.dtype))
    outs = state_pass(keys, G, w, u, starts.reshape(BH * segments, K, V).astype(S0.dtype), write_states=write_states,
                      **output)
    return outs[0] if write_states else None, S_final.astype(S0.dtype), P, *outs[1 + write_states:]


def flow_block(tuning: Tuning, dtype, n: int, K: int, V: int, mosaic: bool) -> int:
    """Column block of the segment-flow pass (``Tuning.flow_block_v``) for ``n`` micro-steps a chunk; None: 128 on
    Mosaic where it divides ``K`` and ``V`` and its tiles fit (half the programs of 64: one wave at 1 x 65536 x 16
    heads, 4 segments), else ``block_v``."""
    if tuning.flow_block_v is not None:
        return tuning.flow_block_v
    wide = mosaic and K % 128 == 0 and V % 128 == 0 and flow_fits(dtype, n, K, 128)
    return 128 if wide else tuning.block_v


def segmented_cotangents(qc, keys, G, w, do, dS_final, P, *, rank: int, scale: float, heads: int | None,
                         tuning: Tuning, resets=None, dfinals=None, zero_dfinals: bool = False, mosaic: bool = False,
                         scores=None, packed_rows=None):
    """The segmented scan, backward: :func:`state_pass_bwd_kernel`'s outputs (dS_out, dv', dS0) from
    (1) every segment's reverse pass from a zero cotangent (only the cotangent entering it, ``b``), in
    parallel; (2) a reverse associative scan over segments with the forward's ``P``; (3) every segment's
    reverse pass from its true cotangent, in parallel. P: [BH, segments, K, K]. Packed sequences
    (``resets``, ``dfinals``, ``zero_dfinals``): the final states' cotangents enter inside the passes; a last
    output, dh0. ``mosaic``: passes (1) and (3) on Mosaic GPU (``state_pass_bwd_mosaic``; unpacked, rank 1,
    scalar decays). ``scores``: the forward's attention blocks (per-channel decays), read by both passes.
    ``packed_rows``: q, keys and do are packed rows read in place (``state_pass_bwd_kernel``)."""
    BH, segments, K, _ = P.shape
    V = do.shape[-1]
    opts = dict(rank=rank, scale=scale, heads=heads, segments=segments, block_v=tuning.block_v)
    opts |= (dict(num_stages=tuning.mosaic_stages) if mosaic else
             dict(num_warps=tuning.state_warps, num_stages=tuning.state_bwd_stages, scores=scores,
                  packed_rows=packed_rows,
                  **({} if resets is None else dict(resets=resets, dfinals=dfinals, zero_dfinals=zero_dfinals))))
    reverse_pass = functools.partial(state_pass_bwd_mosaic if mosaic else state_pass_bwd_kernel, **opts)
    zero = jnp.zeros((BH * segments, K, V), dS_final.dtype)
    b = reverse_pass(qc, keys, G, w, do, zero, write_states=False).reshape(BH, segments, K, V)
    ends, dS0 = _segment_cotangent_ends(P, b, dS_final)
    dS_out, dv, _, *dh0 = reverse_pass(qc, keys, G, w, do, ends.reshape(BH * segments, K, V).astype(dS_final.dtype))
    return dS_out, dv, dS0.astype(dS_final.dtype), *dh0


@dataclasses.dataclass(frozen=True)
class _Static:
    """The non-differentiable arguments of :func:`_pallas_flow` (hashable)."""

    solver: FlowSolver
    scan: str
    scale: float
    tuning: Tuning
    heads: int
    zero_h0: bool = False  # packed sequences without initial states: the kernels skip reading them
    has_decay: bool = True  # False: the path has no decays (g None): G = 0, no decay cotangents formed


def _micro_decays(st: _Static, log_decay, R: int):
    """``G``, the cumulative decays of every micro-step ([BH, N, C R], scalar decays): the decays kernel, or zeros
    for a path without decays."""
    if st.has_decay:
        return cumulative_decay_kernel(log_decay, R)
    return jnp.zeros((*log_decay.shape[:2], log_decay.shape[2] * R), log_decay.dtype)


def _decay_cotangent(log_decay, dG, R: int):
    """dlog_decay from the micro-step decays' cotangent ``dG`` (None: a path without decays, zeros)."""
    return jnp.zeros_like(log_decay) if dG is None else cumulative_decay_vjp_kernel(log_decay, dG, R)


def _kernel_backward_transfer(solver: FlowSolver) -> bool:
    """Whether ``chunk_transfer_bwd_kernel`` covers the solver's program (``T = (I + L)^{-1}`` or ``T = I``),
    else the reference's vjp."""
    return solver.program().structure in (IDENTITY, INVERSE)


def _additive(solver: FlowSolver) -> bool:
    """Whether the path has no multiplicative steps (``program.ADDITIVE``: linear attention): ``w = 0``, ``u = a v``
    (:func:`_additive_values`), no transfer kernels."""
    return solver.program().structure == ADDITIVE


def _additive_values(values, alpha):
    """``u = a v`` of an additive path, token-major like ``values: [B, N, n, H, V]`` (alpha head-major [BH, N, n]),
    in the dtype of ``values``; free when ``a = 1`` (linear attention: XLA drops the product by ones)."""
    B, N, n, H, _ = values.shape
    a = jnp.moveaxis(alpha.reshape(B, H, N, n), 1, 3)[..., None]
    return (a * values.astype(a.dtype)).astype(values.dtype)


def _generators(w, u, keys, heads: int):
    """``(w, u)`` as the Mosaic GPU passes and the XLA scan take them: head-major, ``w = 0`` materialized for an
    additive path (``w=None``, ``u`` token-major)."""
    return (jnp.zeros(layout_dims(keys, heads), keys.dtype) if w is None else w), to_head_major(u, heads)


def _use_mosaic(t: Tuning, keys, G, n: int, V: int, additive: bool = False) -> bool:
    """Whether the unpacked state passes run on Mosaic GPU (``Tuning.state_lowering``; callers check the
    rest: unpacked, rank 1 for the backward): "auto" on a GPU where it runs them (scalar decays, bf16/f16,
    sizes multiples of 64); "mosaic" also in interpret mode (``state_pass_mosaic`` refuses what it cannot
    run). Packed passes stay on Triton."""
    if t.state_lowering == "auto":  # additive paths (no w) stay on Triton: Mosaic would read a w = 0
        return (not resolve_interpret(None) and G.ndim == 3 and not additive
                and mosaic_runs(keys.dtype, G.dtype, n, keys.shape[-1], V, t.block_v))
    return t.state_lowering == "mosaic"


def _stages(st: _Static, qc, keys, values, beta, alpha, log_decay, S0, resets=None, spans=None, packed_rows=None, *,
            save: bool):
    """The forward kernels. Token-major qc: [B, N, C, H, K], keys: [B, N, n, H, K], values: [B, N, n, H, V]
    (``n = C R``); head-major beta, alpha: [BH, N, n], log_decay: [BH, N, C] (or [BH, N, C, K] per key channel), S0: [BH, K, V]
    -> ((o: [B, N, C, H, V], S_final), (w, u, T, S_in, corrected, P, scores)); with ``save`` (the kernels'
    backward), ``corrected = u - w S_in`` and, for a program computing ``(I + L)^{-1}``, ``T``, else None;
    ``P``: the segments' transition matrices when the segmented scan ran (its backward is segmented too), else
    None; ``scores``: for per-channel decays the output kernel's attention blocks, else None.
    With ``resets`` and ``spans`` (packed sequences, :mod:`flowssm.varlen`): S0 and S_final are [BH, Ns, K, V], one
    per sequence (an empty sequence's final state is its initial state); the sequential pass runs one program
    per (head, sequence), the segmented scan's passes restart at sequence starts. With ``packed_rows`` (a
    :class:`packed.ChunkTable`) q, keys, values and o are the packed rows ``[1, T r, H, ·]``, read and written in
    place by the kernels."""
    H, t = st.heads, st.tuning
    C, n = log_decay.shape[2], beta.shape[2]
    R = n // C
    in_place = dict(packed_rows=packed_rows) if packed_rows is not None else {}
    layout_of = lambda x, size: x if packed_rows is None else packed.to_layout(x, packed_rows, size)
    save_transfer = save and st.solver.program().structure == INVERSE
    additive = _additive(st.solver)
    xla_scan = st.scan == "associative" and t.assoc == "xla"
    # per-channel decays: the decays kernel also writes the keys decayed to the chunk end, the state passes' operand
    decayed = log_decay.ndim == 4 and not additive and not xla_scan
    G, *end_keys = cumulative_decay_kernel(log_decay, R, keys=keys, heads=H, **in_place) if decayed else (
        _micro_decays(st, log_decay, R),)
    state_keys = end_keys[0] if decayed else keys
    if additive:  # w = 0 (never formed or read), u = a v token-major
        w, u, T = None, _additive_values(layout_of(values, n), alpha), []
    else:
        w, u, *T = chunk_transfer_kernel(keys, values, beta, alpha, log_decay, solver=st.solver, mode=t.transfer_mode,
                                         save_transfer=save_transfer, heads=H, score_mode=t.score_mode,
                                         channel_block=t.channel_block, num_warps=t.transfer_warps, G=G,
                                         has_decay=st.has_decay, **in_place)
    BH, N, V = G.shape[0], G.shape[1], u.shape[-1]
    sequences = 1 if resets is None else S0.shape[1]  # the sequential pass runs them in parallel
    programs = BH * sequences * (V // min(t.block_v, V))  # of the sequential pass
    mosaic = resets is None and _use_mosaic(t, keys, G, n, V, additive)
    fusable = mosaic and not xla_scan and R == 1  # the Mosaic pass can compute o (Tuning.output)
    segments = auto_segments(st.scan, N, programs, t, backward=save)
    # a forward without a backward splits from as few chunks as one with a backward where the segments' passes then
    # compute o (run 19, H100, 1 x 16384 and 1 x 65536 x 16 heads: 11 and 17 % faster than sequential with the kernel)
    if fusable and not save:
        split = auto_segments(st.scan, N, programs, t)
        segments = split if fuse_output(t, programs * split) else segments
    fused = fusable and fuse_output(t, programs * segments)  # o from the Mosaic pass
    P = None
    h0, restarts = S0, {} if resets is None else dict(resets=resets, h0=S0, zero_h0=st.zero_h0)
    if resets is not None:  # chunk 0 starts a sequence: the state entering it is never read
        S0 = jnp.zeros((BH, *S0.shape[2:]), S0.dtype)
    save_scores = save and decay.per_channel(G)  # the reverse state pass reads them (see state_pass)
    save_corrected = save and not additive  # additive: the corrected values are u
    output = dict(q=qc, scale=st.scale, save_corrected=save_corrected) if fused else {}
    write_states = save or not fused  # fused without a backward: no S_in written
    saved = []
    if xla_scan:
        flows = chunk_flows(head_major(layout_of(keys, n), H), G, *_generators(w, u, layout_of(keys, n), H))
        if resets is None:
            S_in, S_final = jax.vmap(lambda f, s: chunk_states(f, s, "associative"))(flows, S0)
        else:
            S_in, S_final = jax.vmap(lambda f, h: varlen.chunk_states(f, h, resets, "associative"))(flows, h0)
        S_in = S_in.astype(keys.dtype)
    elif segments > 1:
        S_in, S_final, P, *finals = segmented_states(state_keys, G, *(_generators(w, u, keys, H) if mosaic else (w, u)),
                                                     S0, segments, heads=H, tuning=t, **restarts, mosaic=mosaic,
                                                     decayed_keys=decayed, **in_place, rank=R,
                                                     write_states=write_states, **output)
        saved = finals if fused else saved
        if resets is not None:  # rows of empty sequences are not written by the kernels
            S_final = jnp.where(varlen.nonempty(resets, h0.shape[1])[:, None, None], finals[0], h0)
    elif mosaic:
        outs = state_pass_mosaic(keys, G, *_generators(w, u, keys, H), S0, heads=H, block_v=t.block_v,
                                 num_stages=t.mosaic_stages, write_states=write_states, **output)
        S_in, S_final, *saved = outs if write_states else (None, *outs)
    elif resets is not None:  # sequential: one program per (head, sequence, column block)
        S_in, S_final = state_pass_kernel(state_keys, G, w, u, h0.reshape(-1, *h0.shape[2:]), heads=H,
                                          block_v=t.block_v, num_warps=t.state_warps, num_stages=t.state_stages,
                                          spans=spans, zero_h0=st.zero_h0, decayed_keys=decayed, **in_place, rank=R)
        S_final = S_final.reshape(h0.shape)
    else:  # sequential, or too few chunks to split
        S_in, S_final = state_pass_kernel(state_keys, G, w, u, S0, heads=H, block_v=t.block_v, num_warps=t.state_warps,
                                          num_stages=t.state_stages, decayed_keys=decayed)
    if not fused:
        o = chunk_output_kernel(qc, keys, G, w, u, S_in, rank=n // C, scale=st.scale, out_dtype=keys.dtype,
                                save_corrected=save_corrected, save_scores=save_scores, heads=H,
                                block_v=t.output_block_v, score_mode=t.score_mode, channel_block=t.channel_block,
                                num_warps=t.output_warps, **in_place)
        saved = o if save_corrected or save_scores else (o,)
    o, *saved = saved
    corrected = saved[0] if save_corrected else u if save else None
    scores = saved[-1] if save_scores else None
    return (o, S_final), (w, u, T[0] if T else None, S_in, corrected, P, scores)


def _reference_stages(st: _Static, qc, keys, values, beta, alpha, log_decay, S0, resets=None):
    """:func:`_stages` through the jnp references (the sequential scan), for ``Tuning(backward="reference")``."""
    R = keys.shape[2] // qc.shape[2]
    w, u = chunk_transfer_reference(keys, values, beta, alpha, log_decay, solver=st.solver, heads=st.heads)
    G = micro_log_decay(log_decay, R)
    if resets is None:
        S_in, S_final = state_pass_reference(keys, G, w, u, S0, heads=st.heads)
    else:
        zero = jnp.zeros((S0.shape[0], *S0.shape[2:]), S0.dtype)
        S_in, _, S_final = state_pass_reference(keys, G, w, u, zero, heads=st.heads, resets=resets, h0=S0)
    o = chunk_output_reference(qc, keys, G, w, u, S_in, rank=R, scale=st.scale, out_dtype=keys.dtype, heads=st.heads)
    return o, S_final


def _in_layout(args, packed_rows):
    """The token-major operands (q, keys, values) of packed rows read in place gathered into the chunk-aligned
    layout, for the steps that read the layout (the backward); ``args`` as :func:`_stages`'."""
    if packed_rows is None:
        return args
    qc, keys, values, beta, _, log_decay, *_ = args
    C, n = log_decay.shape[2], beta.shape[2]
    return (packed.to_layout(qc, packed_rows, C), packed.to_layout(keys, packed_rows, n),
            packed.to_layout(values, packed_rows, n),
            *args[3:])


def _rows_of(x, packed_rows):
    """A token-major layout operand (or cotangent) back to packed rows; unchanged without ``packed_rows``."""
    return x if packed_rows is None else packed.from_layout(x, packed_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas_flow(st: _Static, qc, keys, values, beta, alpha, log_decay, S0, resets, spans, packed_rows):
    """(o: [BH, N, C, V] in the dtype of ``keys`` (packed rows ``[1, T, H, V]`` with ``packed_rows``), S_final:
    [BH, K, V]); arguments as :func:`_stages` (``resets``, ``spans``, ``packed_rows``: None or integer arrays, no
    cotangent)."""
    return _stages(st, qc, keys, values, beta, alpha, log_decay, S0, resets, spans, packed_rows, save=False)[0]


def _pallas_flow_fwd(st: _Static, *primals):
    args = tuple(jax.tree.map(lambda p: p.value, x, is_leaf=lambda p: isinstance(p, CustomVJPPrimal)) for x in primals)
    out, saved = _stages(st, *args, save=st.tuning.backward == "kernels")
    return out, (args, saved)


def _dense(cotangent):
    """A cotangent as an array (symbolic zeros: ``defvjp(..., symbolic_zeros=True)``)."""
    return jnp.zeros(cotangent.aval.shape, cotangent.aval.dtype) if isinstance(cotangent, SymbolicZero) else cotangent


def _pallas_flow_bwd(st: _Static, residuals, cotangents):
    args, (w, u, T, S_in, corrected, P, scores) = residuals
    *args, resets, spans, packed_rows = args
    # packed: when the final states' cotangent is a symbolic zero (a loss of the outputs alone), the
    # reverse passes never read it
    zero_dfinals = resets is not None and isinstance(cotangents[1], SymbolicZero)
    cotangents = tuple(map(_dense, cotangents))
    if st.tuning.backward == "reference":
        reference = lambda *a: (lambda o, S: (_rows_of(o, packed_rows), S))(
            *_reference_stages(st, *_in_layout(a, packed_rows), resets))
        return (*jax.vjp(reference, *args)[1](cotangents), None, None, None)
    qc, keys, values, beta, alpha, log_decay, S0 = args
    do, dS_final = cotangents
    H, t = st.heads, st.tuning
    n = beta.shape[2]
    R = n // log_decay.shape[2]
    in_place = {} if packed_rows is None else dict(packed_rows=packed_rows)
    G = _micro_decays(st, log_decay, R)
    dfinals, restarts = dS_final.astype(S0.dtype), {}
    if resets is not None:  # the final states' cotangents enter inside the passes; none at the end
        restarts = dict(resets=resets, dfinals=dfinals, zero_dfinals=zero_dfinals)
        dS_final = jnp.zeros((S0.shape[0], *S0.shape[2:]), S0.dtype)
    additive = _additive(st.solver)
    mosaic = resets is None and R == 1 and _use_mosaic(t, keys, G, n, do.shape[-1], additive)
    w_pass = _generators(w, u, keys, H)[0] if mosaic else w
    if P is None and mosaic:
        dS_out, dv, dS0 = state_pass_bwd_mosaic(qc, keys, G, w_pass, do, dS_final.astype(S0.dtype), rank=R,
                                                scale=st.scale, heads=H, block_v=t.block_v, num_stages=t.mosaic_stages)
    elif P is None and resets is not None:  # one program per (head, sequence, column block)
        dS_out, dv, dS0 = state_pass_bwd_kernel(qc, keys, G, w, do, dfinals.reshape(-1, *dfinals.shape[2:]), rank=R,
                                                scale=st.scale, heads=H, block_v=t.block_v, num_warps=t.state_warps,
                                                num_stages=t.state_bwd_stages, spans=spans, zero_dfinals=zero_dfinals,
                                                scores=scores, **in_place)
        dS0 = dS0.reshape(S0.shape)
    elif P is None:
        dS_out, dv, dS0 = state_pass_bwd_kernel(qc, keys, G, w, do, dS_final.astype(S0.dtype), rank=R, scale=st.scale,
                                                heads=H, block_v=t.block_v, num_warps=t.state_warps,
                                                num_stages=t.state_bwd_stages, scores=scores)
    else:
        dS_out, dv, dS0, *dh0 = segmented_cotangents(qc, keys, G, w_pass, do, dS_final.astype(S0.dtype), P, rank=R,
                                                     scale=st.scale, heads=H, tuning=t, **restarts, mosaic=mosaic,
                                                     scores=scores, **in_place)
        if resets is not None:  # an empty sequence's final state is its initial state
            dS0 = jnp.where(varlen.nonempty(resets, S0.shape[1])[:, None, None], dh0[0], dfinals)
    # dw = -dv' S_in^T is formed by the transfer backward, which reads dv' anyway (not written here, read back there)
    dq, dk, dG = chunk_output_bwd_kernel(qc, keys, G, corrected, S_in, dS_out, do, rank=R, scale=st.scale, heads=H,
                                         block_k=t.block_k, score_mode=t.score_mode, num_warps=t.backward_warps,
                                         decay_grads=st.has_decay, **in_place)
    if additive:  # u = a v: dv' gives dvalues and dalpha; beta is not read
        layout_values = _in_layout(args, packed_rows)[2]
        dvalues, dalpha = jax.vjp(_additive_values, layout_values, alpha)[1](token_major(dv, H).astype(values.dtype))
        grads = (dq, dk, _rows_of(dvalues, packed_rows), jnp.zeros_like(beta), dalpha,
                 _decay_cotangent(log_decay, dG, R), dS0)
        return (*(d.astype(x.dtype) for d, x in zip(grads, args)), None, None, None)
    if _kernel_backward_transfer(st.solver):
        transfer_bwd = functools.partial(chunk_transfer_bwd_kernel, score_mode=t.score_mode,
                                         num_warps=t.backward_warps, **in_place)
        token_args = (keys, values)
    else:  # the reference's vjp reads the layout
        transfer_bwd, token_args = chunk_transfer_bwd_reference, _in_layout(args, packed_rows)[1:3]
        dk = dk if packed_rows is None else packed.to_layout(dk, packed_rows, n)
    # the output backward's shares of dkeys and dG are added inside, before dkeys' one rounding
    dkeys, dvalues, dbeta, dalpha, dlog_decay = transfer_bwd(*token_args, beta, alpha, log_decay, T, w, u, None, dv,
                                                             solver=st.solver, heads=H, G=G, dG=dG, dkeys=dk,
                                                             S_in=S_in, decay_grads=st.has_decay)
    if transfer_bwd is chunk_transfer_bwd_reference:
        dkeys, dvalues = _rows_of(dkeys, packed_rows), _rows_of(dvalues, packed_rows)
    grads = (dq, dkeys, dvalues, dbeta, dalpha, dlog_decay, dS0)
    return (*(d.astype(x.dtype) for d, x in zip(grads, args)), None, None, None)


_pallas_flow.defvjp(_pallas_flow_fwd, _pallas_flow_bwd, symbolic_zeros=True)


def chunked_pallas(q, path: Path, S0, *, scale: float, chunk_size: int, solver: FlowSolver, scan: str,
                   semantics: str, tuning: Tuning | None = None, layout: varlen.Layout | None = None,
                   has_decay: bool = True):
    """q: [B, T, H, K] (fla layout), path: head-major :class:`Path`, S0: [B, H, K, V]
    -> (o: [B, T, H, V] in the path dtype, final state [B, H, K, V]).

    With ``layout`` (packed sequences, ``B = 1``: :mod:`flowssm.varlen`'s chunk-aligned layout of the ``T`` packed
    tokens): S0 and the final state are [Ns, H, K, V], one per sequence; ``S0`` may then be ``None``: no initial
    states (zeros, which the kernels then never read). The kernels read q, keys, values (and do) and write o (and
    dq, dkeys, dvalues) in place, in the packed row (:mod:`.packed`); the head-major steps and decays are gathered
    into the layout.

    q, keys, values and o reach the kernels token-major (``common.token_spec``): for rank 1 a view of
    the fla-layout arrays once XLA cancels ``make_path``'s transpose.

    Keys, values and queries enter the kernels in :func:`operand_dtype` (exact when ``k, v`` have the
    query's dtype); steps, decays and states stay in the path dtype. The arguments are what
    :func:`flowssm.backends.check` accepts for "pallas" (the ops check before calling): discrete semantics.
    A sequence whose kernel arrays would outgrow int32 indexing (:data:`MAX_ELEMENTS`) runs as consecutive
    calls on pieces of whole chunks, each starting from the state the previous one left (exact; autodiff
    chains them). ``has_decay=False``: the path's log-decay is zero (``g`` None): ``G = 0`` is not computed by a
    kernel and the backward forms no decay cotangents (the log-decay's gradient is returned as zeros).
    """
    if not has_decay and path.per_channel:
        raise ValueError(f"has_decay: False is for paths without decays, got per-channel log_decay "
                         f"{path.log_decay.shape}")
    tuning = tuning or Tuning()
    B, H, T, R, K = path.keys.shape
    V = path.values.shape[-1]
    C, Rp, Kp, Vp = chunk_size, _pow2(R), _pow2(K, 16), _pow2(V, 16)
    n = C * Rp
    N = -(-T // C) if layout is None else layout.resets.seq.shape[0]
    BH = B * H
    piece = MAX_ELEMENTS // (BH * max(Kp * Vp, n * max(Kp, Vp, n)))  # chunks a call can index in int32
    piece = (piece - piece % PIECE_ALIGN if piece >= 2 * PIECE_ALIGN else piece) * C
    resets, spans = (None, None) if layout is None else (layout.resets, layout.spans)
    if piece < N * C:  # e.g. 1M tokens x 16 heads: the states entering the chunks alone have 2^32 elements
        if layout is not None:
            raise ValueError(f"cu_seqlens: packed calls are limited to {piece} tokens on pallas (int32 indexing of "
                             f"the kernels' arrays), got T = {T} (with its chunk-aligned padding); use backend 'xla'")
        if piece == 0:
            raise ValueError(f"q: B * H = {BH} heads of {K} x {V} states are too many for one kernel call; "
                             f"split the batch")
        outs, S = [], S0
        for start in range(0, T, piece):
            part = map_path(path, lambda x: x[:, :, start:start + piece])
            o, S = chunked_pallas(q[:, start:start + piece], part, S, scale=scale, chunk_size=chunk_size,
                                  solver=solver, scan=scan, semantics=semantics, tuning=tuning, has_decay=has_decay)
            outs.append(o)
        return jnp.concatenate(outs, axis=1), S
    od = operand_dtype(q, path)
    zero_h0 = S0 is None
    if zero_h0:
        if layout is None:
            raise ValueError("S0: None (no initial states) needs packed sequences (a layout)")
        S0 = jnp.zeros((spans.first.shape[0], H, K, V), path.beta.dtype)  # the path dtype (keys may be operand dtype)
    tuning = tuning.resolve(od, Kp, Vp, C, n, per_channel=path.per_channel)
    packed_rows = None if layout is None else packed.table(layout, T, C)
    # token-major operands: for R = 1 (and no padding) a free view of the fla-layout inputs; XLA cancels
    # make_path's head-major transpose and the round trip through the path dtype. Packed: the rows themselves
    rows = (lambda x, size: x.reshape(B, N, size, H, x.shape[-1])) if layout is None else (
        lambda x, size: x.reshape(B, -1, H, x.shape[-1]))
    if layout is None:  # identity tokens up to whole chunks
        path, q, slots = pad_path(path, N * C), _pad_to(q, {1: N * C}), lambda x: x
    else:  # the head-major vectors gathered into the layout's slots; q, keys and values stay packed rows
        slots = lambda x: varlen.to_slots(x, layout, 2)
    keys, values = (rows(jnp.moveaxis(_pad_to(x, {3: Rp, 4: d}), 1, 3).astype(od), n)
                    for x, d in ((path.keys, Kp), (path.values, Vp)))
    beta, alpha = (_pad_to(slots(x), {3: Rp}).reshape(BH, N, n) for x in (path.beta, path.alpha))
    log_decay = (_pad_to(slots(path.log_decay), {3: Kp}).reshape(BH, N, C, Kp) if path.per_channel  # padded: 0
                 else slots(path.log_decay).reshape(BH, N, C))
    qc = rows(_pad_to(q, {3: Kp}).astype(od), C)
    S0p = _pad_to(S0, {2: Kp, 3: Vp})
    S0p = S0p.reshape(BH, Kp, Vp) if resets is None else jnp.moveaxis(S0p, 0, 1)  # [BH, Ns, Kp, Vp] for B = 1
    st = _Static(solver=solver, scan=scan, scale=scale, tuning=tuning, heads=H, zero_h0=zero_h0,
                 has_decay=has_decay)
    o, S_final = _pallas_flow(st, qc, keys, values, beta, alpha, log_decay, S0p, resets, spans, packed_rows)
    o = o.reshape(B, -1, H, Vp)[:, :T, :, :V]
    S_final = S_final.reshape(B, H, Kp, Vp) if resets is None else jnp.moveaxis(S_final, 1, 0)
    return o.astype(path.keys.dtype), S_final[..., :K, :V]
