"""``backend="pallas"``: the chunked flow computation as Pallas kernels, forward and backward.

Forward:

1. ``chunk_transfer``: per (head, chunk), ``w, u`` from the chunk's system (Gram matrix and ``T``).
2. the scan, giving the state entering every chunk: ``sequential`` runs the ``state_pass`` kernel over
   all chunks; ``associative`` runs a two-level (blocked) scan of the same composition law
   (:func:`segmented_states`: segment flows in parallel, composed in XLA, then the state pass inside
   every segment in parallel). ``Tuning(assoc="xla")`` uses ``jax.lax.associative_scan`` over dense
   chunk flows instead.
3. ``chunk_output``: per (head, chunk), corrected values and outputs.

Backward (``Tuning(backward="kernels")``, a ``jax.custom_vjp`` over the three stages; residuals are the
inputs, ``w, u``, the states entering the chunks and, for exact programs, the chunks' ``T``):

1. ``state_pass_bwd``: the reverse pass of the state cotangent (sequential over chunks, whichever scan
   ran forward), giving ``dv'`` and the cotangent of the state leaving every chunk.
2. ``chunk_output_bwd``: per (head, chunk), ``dq`` and the shares of ``dk, dw, dG``.
3. ``chunk_transfer_bwd``: per (head, chunk), through ``w = T (b e^G k), u = T (a v)`` with the saved
   ``T`` (programs computing ``(I + L)^{-1}``: every exact method) or ``T = I`` (euler); other programs
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

from flowssm.kernels.chunk_output import chunk_output_bwd_kernel, chunk_output_kernel, chunk_output_reference
from flowssm.kernels.chunk_transfer import (chunk_transfer_bwd_kernel, chunk_transfer_bwd_reference,
                                            chunk_transfer_kernel, chunk_transfer_reference, micro_log_decay)
from flowssm.kernels.common import head_major
from flowssm.kernels.launch import Tuning
from flowssm.kernels.state_pass import chunk_flows, state_pass_bwd_kernel, state_pass_kernel, state_pass_reference
from flowssm.flows import DenseFlow
from flowssm.paths import Path, pad_path
from flowssm.scan import chunk_states
from flowssm.solvers import FlowSolver
from flowssm.solvers.program import IDENTITY, INVERSE

def _pow2(x: int, floor: int = 1) -> int:
    return max(floor, 1 << (x - 1).bit_length())


def _pad_to(x, sizes: dict[int, int]):
    return jnp.pad(x, [(0, sizes.get(a, d) - d) for a, d in enumerate(x.shape)])


def operand_dtype(q, path: Path):
    """Matmul operand dtype: the query's (bf16 inputs -> bf16 tensor cores), float64 for float64 paths."""
    return jnp.float64 if path.keys.dtype == jnp.float64 else q.dtype


def segmented_states(keys, G, w, u, S0, tuning: Tuning):
    """Two-level scan. keys, w: [BH, N, n, K], G: [BH, N, n], u: [BH, N, n, V], S0: [BH, K, V]
    -> (S_in: [BH, N, K, V] in the dtype of ``keys``, S_final: [BH, K, V]).

    Segments of ``M`` chunks: (1) every segment's flow ``[P | Q]`` (the state pass of ``[P | Q]`` from
    ``[I | 0]``, only its end written), in parallel over (head, segment); (2) XLA composes the segment
    flows in order, giving the state entering each segment; (3) the state pass again, in parallel over
    (head, segment), from those states: the states entering the chunks. Depth ``2 M + N / M`` steps
    instead of ``N``, for twice the state-pass arithmetic.
    """
    BH, N, n, K = keys.shape
    V = u.shape[-1]
    M = -(-N // max(1, min(N, tuning.segment_programs // BH)))  # chunks a segment
    segs = -(-N // M)
    pad = lambda x: _pad_to(x, {1: segs * M}).reshape(BH * segs, M, *x.shape[2:])  # identity chunks
    keys, G, w, u = map(pad, (keys, G, w, u))
    options = dict(num_warps=tuning.state_warps, num_stages=tuning.state_stages)
    u_ext = jnp.concatenate([jnp.zeros_like(w), u], axis=-1)  # the pass of [P | Q] from [I | 0]
    start = jnp.concatenate([jnp.eye(K, dtype=S0.dtype), jnp.zeros((K, V), S0.dtype)], axis=-1)
    seg = state_pass_kernel(keys, G, w, u_ext, jnp.broadcast_to(start, (BH * segs, K, K + V)), write_states=False,
                            block_v=min(tuning.block_v, K, V), **options)
    seg = seg.reshape(BH, segs, K, K + V)
    S_seg, S_final = jax.vmap(lambda f, s: chunk_states(f, s, "sequential"))(DenseFlow(seg[..., :K], seg[..., K:]), S0)
    S_in, _ = state_pass_kernel(keys, G, w, u, S_seg.reshape(BH * segs, K, V), block_v=min(tuning.block_v, V),
                                **options)
    return S_in.reshape(BH, segs * M, K, V)[:, :N], S_final


@dataclasses.dataclass(frozen=True)
class _Static:
    """The non-differentiable arguments of :func:`_pallas_flow` (hashable)."""

    solver: FlowSolver
    scan: str
    scale: float
    mode: str
    tuning: Tuning
    heads: int


def _kernel_backward_transfer(solver: FlowSolver) -> bool:
    """Whether ``chunk_transfer_bwd_kernel`` covers the solver's program (``T = (I + L)^{-1}`` or ``T = I``),
    else the reference's vjp."""
    return solver.program().structure in (IDENTITY, INVERSE)


def _stages(st: _Static, qc, keys, values, beta, alpha, log_decay, S0, *, save: bool):
    """The forward kernels. Token-major qc: [B, N, C, H, K], keys: [B, N, n, H, K], values: [B, N, n, H, V]
    (``n = C R``); head-major beta, alpha: [BH, N, n], log_decay: [BH, N, C], S0: [BH, K, V]
    -> ((o: [B, N, C, H, V], S_final), (w, u, T, S_in, corrected)); with ``save`` (the kernels' backward),
    ``corrected = u - w S_in`` and, for a program computing ``(I + L)^{-1}``, ``T``, else None."""
    H, t = st.heads, st.tuning
    C, n = qc.shape[2], keys.shape[2]
    save_transfer = save and st.solver.program().structure == INVERSE
    w, u, *T = chunk_transfer_kernel(keys, values, beta, alpha, log_decay, solver=st.solver, mode=st.mode,
                                     save_transfer=save_transfer, heads=H, num_warps=t.transfer_warps)
    G = micro_log_decay(log_decay, n // C)
    if st.scan == "sequential":
        S_in, S_final = state_pass_kernel(keys, G, w, u, S0, heads=H, block_v=min(t.block_v, u.shape[-1]),
                                          num_warps=t.state_warps, num_stages=t.state_stages)
    elif t.assoc == "xla":
        flows = chunk_flows(head_major(keys, H), G, w, u)
        S_in, S_final = jax.vmap(lambda f, s: chunk_states(f, s, "associative"))(flows, S0)
        S_in = S_in.astype(keys.dtype)
    else:
        S_in, S_final = segmented_states(head_major(keys, H), G, w, u, S0, t)
    o = chunk_output_kernel(qc, keys, G, w, u, S_in, rank=n // C, scale=st.scale, out_dtype=keys.dtype,
                            save_corrected=save, heads=H, block_v=t.output_block_v, num_warps=t.output_warps)
    o, corrected = o if save else (o, None)
    return (o, S_final), (w, u, T[0] if T else None, S_in, corrected)


def _reference_stages(st: _Static, qc, keys, values, beta, alpha, log_decay, S0):
    """:func:`_stages` through the jnp references (the sequential scan), for ``Tuning(backward="reference")``."""
    R = keys.shape[2] // qc.shape[2]
    w, u = chunk_transfer_reference(keys, values, beta, alpha, log_decay, solver=st.solver, heads=st.heads)
    G = micro_log_decay(log_decay, R)
    S_in, S_final = state_pass_reference(keys, G, w, u, S0, heads=st.heads)
    o = chunk_output_reference(qc, keys, G, w, u, S_in, rank=R, scale=st.scale, out_dtype=keys.dtype, heads=st.heads)
    return o, S_final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas_flow(st: _Static, qc, keys, values, beta, alpha, log_decay, S0):
    """(o: [BH, N, C, V] in the dtype of ``keys``, S_final: [BH, K, V]); arguments as :func:`_stages`."""
    return _stages(st, qc, keys, values, beta, alpha, log_decay, S0, save=False)[0]


def _pallas_flow_fwd(st: _Static, *args):
    out, saved = _stages(st, *args, save=st.tuning.backward == "kernels")
    return out, (args, saved)


def _pallas_flow_bwd(st: _Static, residuals, cotangents):
    args, (w, u, T, S_in, corrected) = residuals
    if st.tuning.backward == "reference":
        return jax.vjp(lambda *a: _reference_stages(st, *a), *args)[1](cotangents)
    qc, keys, values, beta, alpha, log_decay, S0 = args
    do, dS_final = cotangents
    H, t = st.heads, st.tuning
    n = keys.shape[2]
    R = n // qc.shape[2]
    G = micro_log_decay(log_decay, R)
    dS_out, dv, dS0 = state_pass_bwd_kernel(qc, keys, G, w, do, dS_final.astype(S0.dtype), rank=R, scale=st.scale,
                                            heads=H, block_v=min(t.block_v, u.shape[-1]), num_warps=t.state_warps,
                                            num_stages=t.state_stages)
    dq, dk, dw, dG = chunk_output_bwd_kernel(qc, keys, G, corrected, S_in, dS_out, do, dv, rank=R, scale=st.scale,
                                             heads=H, block_k=t.block_k, num_warps=t.backward_warps)
    transfer_bwd = (functools.partial(chunk_transfer_bwd_kernel, num_warps=t.backward_warps)
                    if _kernel_backward_transfer(st.solver) else chunk_transfer_bwd_reference)
    dkeys, dvalues, dbeta, dalpha, dlog_decay = transfer_bwd(keys, values, beta, alpha, log_decay, T, w, u, dw, dv,
                                                             solver=st.solver, heads=H)
    dlog_decay = dlog_decay + jax.vjp(lambda ld: micro_log_decay(ld, R), log_decay)[1](dG)[0]
    grads = (dq, dkeys + dk, dvalues, dbeta, dalpha, dlog_decay, dS0)
    return tuple(d.astype(x.dtype) for d, x in zip(grads, args))


_pallas_flow.defvjp(_pallas_flow_fwd, _pallas_flow_bwd)


def chunked_pallas(q, path: Path, S0, *, scale: float, chunk_size: int, solver: FlowSolver, scan: str,
                   semantics: str, tuning: Tuning = Tuning()):
    """q: [B, T, H, K] (fla layout), path: head-major :class:`Path`, S0: [B, H, K, V]
    -> (o: [B, T, H, V] in the path dtype, final state [B, H, K, V]).

    q, keys, values and o reach the kernels token-major (``common.token_spec``): for rank 1 a view of
    the fla-layout arrays once XLA cancels ``make_path``'s transpose.

    Keys, values and queries enter the kernels in :func:`operand_dtype` (exact when ``k, v`` have the
    query's dtype); steps, decays and states stay in the path dtype. The arguments are what
    :func:`flowssm.backends.check` accepts for "pallas" (the ops check before calling).
    """
    del semantics  # discrete: backends.check refused anything else (and unrunnable solvers) before the call
    mode = tuning.transfer_mode or ("tf32" if jnp.finfo(operand_dtype(q, path)).bits < 32 else "operand")
    B, H, T, R, K = path.keys.shape
    V = path.values.shape[-1]
    C, Rp, Kp, Vp = chunk_size, _pow2(R), _pow2(K, 16), _pow2(V, 16)
    n = C * Rp
    N = -(-T // C)
    BH = B * H
    od = operand_dtype(q, path)
    tuning = tuning.resolve(od, Kp, Vp, C, n)
    path = pad_path(path, N * C)
    # token-major operands: for R = 1 (and no padding) a free view of the fla-layout inputs; XLA cancels
    # make_path's head-major transpose and the round trip through the path dtype
    token_major = lambda x, d: jnp.moveaxis(_pad_to(x, {3: Rp, 4: d}), 1, 3).astype(od).reshape(B, N, n, H, d)
    keys, values = token_major(path.keys, Kp), token_major(path.values, Vp)
    beta, alpha = (_pad_to(x, {3: Rp}).reshape(BH, N, n) for x in (path.beta, path.alpha))
    log_decay = path.log_decay.reshape(BH, N, C)
    qc = _pad_to(q, {1: N * C, 3: Kp}).astype(od).reshape(B, N, C, H, Kp)
    S0p = _pad_to(S0, {2: Kp, 3: Vp}).reshape(BH, Kp, Vp)
    st = _Static(solver=solver, scan=scan, scale=scale, mode=mode, tuning=tuning, heads=H)
    o, S_final = _pallas_flow(st, qc, keys, values, beta, alpha, log_decay, S0p)
    o = o.reshape(B, N * C, H, Vp)[:, :T, :, :V]
    return o.astype(path.keys.dtype), S_final.reshape(B, H, Kp, Vp)[..., :K, :V]
