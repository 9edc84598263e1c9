"""``backend="pallas"``: the chunked flow computation as three Pallas kernels.

1. ``chunk_transfer``: per (head, chunk), ``w, u`` from the chunk's system (Gram matrix and ``T``).
2. the scan, giving the state entering every chunk: ``sequential`` runs the ``state_pass`` kernel over
   all chunks; ``associative`` runs a two-level (blocked) scan of the same composition law: the
   ``state_pass`` kernel computes, in parallel over segments of chunks, every chunk's prefix flow
   ``(P_pre, Q_pre)`` inside its segment (as the state pass of ``[P | Q]`` from ``[I | 0]``); XLA
   composes the segment flows (sequentially, few steps) and applies ``S_in = P_pre S_seg + Q_pre``.
   ``Tuning(assoc="xla")`` uses ``jax.lax.associative_scan`` over dense chunk flows instead.
3. ``chunk_output``: per (head, chunk), corrected values and outputs.

Backward: the transfer and output kernels' backward is the autodiff of their jnp references
(recomputed in the backward pass, XLA). The state pass's backward is the same by default
(``Tuning(state_backward="reference")``, checked on the H100); ``state_backward="kernel"`` uses the
reverse-loop backward kernel ``state_pass_bwd_kernel`` (checked in interpret mode only so far).
Inputs are padded exactly: ``T`` to whole chunks and ``R`` to a power of two with identity micro-steps,
``K`` and ``V`` with zeros to powers of two >= 16 (the kernels' block shapes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flowssm.kernels.chunk_output import chunk_output_kernel, chunk_output_reference
from flowssm.kernels.chunk_transfer import chunk_transfer_kernel, chunk_transfer_reference, micro_log_decay
from flowssm.kernels.common import DOT_MODES, with_reference_vjp
from flowssm.kernels.state_pass import chunk_flows, state_pass, state_pass_kernel, state_pass_reference
from flowssm.flows import DenseFlow
from flowssm.paths import Path, pad_path
from flowssm.scan import SCANS, chunk_states
from flowssm.solvers import FlowSolver

chunk_transfer = with_reference_vjp(chunk_transfer_kernel, chunk_transfer_reference)
chunk_output = with_reference_vjp(chunk_output_kernel, chunk_output_reference)
STATE_PASSES = {"kernel": state_pass, "reference": with_reference_vjp(state_pass_kernel, state_pass_reference)}


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch options: Triton warps/stages per kernel and the state pass's ``V`` block.

    transfer_mode: matmul mode of the ``T`` powers (``common.DOT_MODES``; None: "tf32" for bf16/f16
    operands, full precision otherwise). assoc: "segmented" or "xla" (see the module docstring);
    segment_programs: the segmented scan uses about this many (head, segment) pairs.
    state_backward: "reference" or "kernel" (see the module docstring).
    """

    transfer_mode: str | None = None
    transfer_warps: int = 4
    state_warps: int = 4
    state_stages: int = 2
    block_v: int = 64
    output_warps: int = 4
    assoc: str = "segmented"
    state_backward: str = "reference"
    segment_programs: int = 256


def _pow2(x: int, floor: int = 1) -> int:
    return max(floor, 1 << (x - 1).bit_length())


def _pad_to(x, sizes: dict[int, int]):
    return jnp.pad(x, [(0, sizes.get(a, d) - d) for a, d in enumerate(x.shape)])


def operand_dtype(q, path: Path):
    """Matmul operand dtype: the query's (bf16 inputs -> bf16 tensor cores), float64 for float64 paths."""
    return jnp.float64 if path.keys.dtype == jnp.float64 else q.dtype


def segmented_states(keys, G, w, u, S0, tuning: Tuning):
    """Two-level scan. keys, w: [BH, N, n, K], G: [BH, N, n], u: [BH, N, n, V], S0: [BH, K, V]
    -> (S_in: [BH, N, K, V] in the dtype of ``keys``, S_final: [BH, K, V])."""
    BH, N, n, K = keys.shape
    V = u.shape[-1]
    M = -(-N // max(1, min(N, tuning.segment_programs // BH)))  # chunks a segment
    segs = -(-N // M)
    pad = lambda x: _pad_to(x, {1: segs * M}).reshape(BH * segs, M, *x.shape[2:])  # identity chunks
    u_ext = jnp.concatenate([jnp.zeros_like(w), u], axis=-1)  # the pass of [P | Q] from [I | 0]
    start = jnp.concatenate([jnp.eye(K, dtype=S0.dtype), jnp.zeros((K, V), S0.dtype)], axis=-1)
    pre, seg = STATE_PASSES[tuning.state_backward](
        pad(keys), pad(G), pad(w), pad(u_ext), jnp.broadcast_to(start, (BH * segs, K, K + V)),
        block_v=min(tuning.block_v, K, V), num_warps=tuning.state_warps, num_stages=tuning.state_stages)
    seg = seg.reshape(BH, segs, K, K + V)
    segment_flows = DenseFlow(seg[..., :K], seg[..., K:])
    S_seg, S_final = jax.vmap(lambda f, s: chunk_states(f, s, "sequential"))(segment_flows, S0)
    pre = pre.reshape(BH, segs, M, K, K + V)
    S_in = jnp.einsum("bsmkj,bsjv->bsmkv", pre[..., :K], S_seg.astype(pre.dtype), preferred_element_type=S0.dtype)
    S_in = (S_in + pre[..., K:]).reshape(BH, segs * M, K, V)[:, :N]
    return S_in.astype(keys.dtype), S_final


def chunked_pallas(q, path: Path, S0, *, scale: float, chunk_size: int, solver: FlowSolver, scan: str,
                   semantics: str, tuning: Tuning = Tuning(), interpret: bool | None = None):
    """q: [B, T, H, K] (fla layout), path: head-major :class:`Path`, S0: [B, H, K, V]
    -> (o: [B, T, H, V] in the path dtype, final state [B, H, K, V]).

    Keys, values and queries enter the kernels in :func:`operand_dtype` (exact when ``k, v`` have the
    query's dtype); steps, decays and states stay in the path dtype. Only discrete semantics.
    """
    if semantics != "discrete":
        raise NotImplementedError(
            f"semantics: backend='pallas' implements 'discrete' only, got {semantics!r}; use backend='xla'")
    if scan not in SCANS:
        raise ValueError(f"scan: expected one of {SCANS}, got {scan!r}")
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: backend='pallas' needs a power of two, got {chunk_size}")
    mode = tuning.transfer_mode or ("tf32" if jnp.finfo(operand_dtype(q, path)).bits < 32 else "operand")
    if mode not in DOT_MODES:
        raise ValueError(f"transfer_mode: expected one of {DOT_MODES}, got {mode!r}")
    B, H, T, R, K = path.keys.shape
    V = path.values.shape[-1]
    C, Rp, Kp, Vp = chunk_size, _pow2(R), _pow2(K, 16), _pow2(V, 16)
    n = C * Rp
    if n < 16:
        raise ValueError(f"chunk_size: backend='pallas' needs chunk_size * R >= 16, got {chunk_size} * {R}")
    N = -(-T // C)
    BH = B * H
    od = operand_dtype(q, path)
    path = pad_path(path, N * C)
    keys = _pad_to(path.keys, {3: Rp, 4: Kp}).astype(od).reshape(BH, N, C, Rp, Kp)
    values = _pad_to(path.values, {3: Rp, 4: Vp}).astype(od).reshape(BH, N, C, Rp, Vp)
    beta, alpha = (_pad_to(x, {3: Rp}).reshape(BH, N, C, Rp) for x in (path.beta, path.alpha))
    log_decay = path.log_decay.reshape(BH, N, C)
    qc = _pad_to(jnp.moveaxis(q, 2, 1), {2: N * C, 3: Kp}).astype(od).reshape(BH, N, C, Kp)
    S0p = _pad_to(S0, {2: Kp, 3: Vp}).reshape(BH, Kp, Vp)

    w, u = chunk_transfer(keys, values, beta, alpha, log_decay, solver=solver, mode=mode,
                          num_warps=tuning.transfer_warps)
    G = micro_log_decay(log_decay, Rp)
    keys = keys.reshape(BH, N, n, Kp)
    if scan == "sequential":
        S_in, S_final = STATE_PASSES[tuning.state_backward](
            keys, G, w, u, S0p, block_v=min(tuning.block_v, Vp), num_warps=tuning.state_warps,
            num_stages=tuning.state_stages)
    elif tuning.assoc == "xla":
        S_in, S_final = jax.vmap(lambda f, s: chunk_states(f, s, "associative"))(chunk_flows(keys, G, w, u), S0p)
        S_in = S_in.astype(od)
    else:
        S_in, S_final = segmented_states(keys, G, w, u, S0p, tuning)
    o = chunk_output(qc, keys, G, w, u, S_in, rank=Rp, scale=scale, out_dtype=od, num_warps=tuning.output_warps)
    o = jnp.moveaxis(o.reshape(B, H, N * C, Vp)[:, :, :T, :V], 1, 2)
    return o.astype(path.keys.dtype), S_final.reshape(B, H, Kp, Vp)[..., :K, :V]
